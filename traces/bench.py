"""`trace bench`: load, compile, prefill, decode and traced-decode speed, peak anonymous memory, and the
same figures for llama.cpp (llama-cpp-python, extra `peers`) on the same file, threads and run.

Every figure is measured here, now; the report quotes ratios to the peer because machines are shared
and absolute times drift. Compile times are measured in child processes: `cold` with an empty Numba
cache, `warm` with the cache the cold child filled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import InputError


def rss_anon_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PeakMemory:
    """Samples this process's RssAnon every 10 ms while active."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon_mb())

    def __enter__(self):
        self.peak = rss_anon_mb()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon_mb())


@dataclass
class BenchResult:
    model: str
    file_gb: float
    threads: int
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    compile_cold_s: float | None
    compile_warm_s: float | None
    start_to_first_token_warm_s: float | None
    prefill_tok_s: float
    decode_tok_s: float
    decode_traced_tok_s: float
    traced_over_untraced: float
    decode_q8_tok_s: float | None  # the cpu-q8 backend, beside a cpu run on a file it applies to; else None
    peak_rss_anon_mb: float
    machine: str
    backend: str = "cpu"
    repeats: int = 1  # each speed is the best of this many runs (peer's too)
    launches_per_token: float | None = None  # kernel launches per decoded token (cuda)
    peer: dict | None = None
    ratios: dict = field(default_factory=dict)
    profile: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_FIRST_CALL = """
import sys, time
t0 = time.perf_counter()  # after the interpreter started: imports, load, first forward
from engine.model import load_model
from engine.forward import forward
from engine.kv_cache import KVCache
import numpy as np
m = load_model(sys.argv[1], with_tokenizer=False, backend=sys.argv[2])
t1 = time.perf_counter()
forward(m, np.array([1, 2, 3]), KVCache.for_model(m, 4))
t2 = time.perf_counter()
print(t2 - t1, t2 - t0)
"""


def q8_applies(model) -> bool:
    """Whether the cpu-q8 backend would compute anything differently on this model (it has weights of a type
    whose single-token products take 8-bit inputs)."""
    from engine.kernels.cpu_q8 import VEC
    from engine.quants import type_name

    return bool({type_name(t) for t in VEC} & set(model.tensor_types.values()))


def first_call_seconds(path: str, cache_dir: str, backend: str = "cpu") -> tuple[float, float]:
    """(first forward, imports + load + first forward) in seconds, in a fresh process whose Numba cache is
    `cache_dir` (numba-cuda kernels are compiled in every process: the cuda figures are equal)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL, path, backend], capture_output=True, text=True, env=env,
                         cwd=root, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    first, total = out.stdout.strip().splitlines()[-1].split()
    return float(first), float(total)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def bench_engine(path: str, *, prompt_tokens: int, gen_tokens: int, threads: int, compile_times: bool = True,
                 progress=None, backend: str = "cpu", repeats: int = 1) -> BenchResult:
    """With backend 'cuda' the same figures on the GPU, plus kernel launches per decoded token. Each speed is
    the best of `repeats` runs: the machines are shared, and a neighbour slows a run, never speeds it up."""
    import numba

    from engine.backend import unavailable_reason
    from engine.forward import forward
    from engine.kv_cache import KVCache
    from engine.model import load_model
    from traces.recorder import TraceRecorder

    numba.set_num_threads(threads)
    cold = warm = start = None
    if compile_times:
        with tempfile.TemporaryDirectory() as cache:
            if progress:
                progress("compiling the kernels in a fresh process (cold cache)")
            cold, _ = first_call_seconds(path, cache, backend)
            if progress:
                progress("first forward in a fresh process (warm cache)")
            warm, start = first_call_seconds(path, cache, backend)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = load_model(path, with_tokenizer=False, backend=backend)
        load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, min(vocab, 30000), size=prompt_tokens)
        forward(model, prompt[:4], KVCache.for_model(model, 8))  # compile (or load the cache) outside the timings
        if progress:
            progress(f"prefill of {prompt_tokens} tokens")
        prefill = 0.0
        for _ in range(repeats):
            cache = KVCache.for_model(model, prompt_tokens + gen_tokens + 1)
            t0 = time.perf_counter()
            logits = forward(model, prompt, cache)
            prefill = max(prefill, prompt_tokens / (time.perf_counter() - t0))

        launches = []

        def decode(recorder=None, model=model) -> float:
            best = 0.0
            for _ in range(repeats):
                c = KVCache.for_model(model, prompt_tokens + gen_tokens + 1)
                lg = forward(model, prompt, c)
                kwargs = {"recorder": recorder} if recorder is not None else {}
                before = model.backend.launches
                t = time.perf_counter()
                for _ in range(gen_tokens):
                    lg = forward(model, np.array([int(np.argmax(lg[-1]))]), c, **kwargs)
                seconds = time.perf_counter() - t  # the logits came back to the host: the GPU is done
                launches.append((model.backend.launches - before) / gen_tokens)
                best = max(best, gen_tokens / seconds)
            return best

        if progress:
            progress(f"decode of {gen_tokens} tokens, untraced and traced")
        dec = decode()
        traced = decode(TraceRecorder(top_k=5))
        del logits
        q8 = None
        if backend == "cpu" and unavailable_reason("cpu-q8") is None and q8_applies(model):
            if progress:
                progress(f"decode of {gen_tokens} tokens with 8-bit activations (the cpu-q8 backend)")
            q8_model = load_model(path, with_tokenizer=False, backend="cpu-q8")
            forward(q8_model, prompt[:1], KVCache.for_model(q8_model, 2))  # its kernels compile outside the timing
            q8 = decode(model=q8_model)
    return BenchResult(
        model=Path(path).name, file_gb=round(Path(path).stat().st_size / 1e9, 3), threads=threads,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, load_s=round(load_s, 3),
        compile_cold_s=None if cold is None else round(cold, 2), compile_warm_s=None if warm is None else round(warm, 2),
        start_to_first_token_warm_s=None if start is None else round(start, 2),
        prefill_tok_s=round(prefill, 2), decode_tok_s=round(dec, 2), decode_traced_tok_s=round(traced, 2),
        traced_over_untraced=round(traced / dec, 3), decode_q8_tok_s=None if q8 is None else round(q8, 2),
        peak_rss_anon_mb=round(mem.peak, 1),
        machine=f"GPU: {model.backend.device}; host: {machine()}" if backend == "cuda" else machine(), backend=backend,
        repeats=repeats,
        launches_per_token=launches[0] if backend == "cuda" else None)


class OpTimer:
    """Time spent in each public method of a model's backend (the one forward's array work), by wrapping
    the methods of that backend instance while active. `linear` calls on the vocabulary-sized matrix are
    reported as `lm_head`. Instrumentation only: the forward and its kernels are the same."""

    def __init__(self, model):
        self.model, self.backend = model, model.backend
        self.seconds: dict[str, float] = {}
        self._names = [n for n in dir(self.backend) if not n.startswith("_") and callable(getattr(self.backend, n))
                       and n not in ("to_host", "from_host", "zeros")]

    def _wrap(self, name, fn):
        vocab = self.model.config.vocab_size

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = "lm_head" if name == "linear" and getattr(args[0], "shape", (0,))[0] == vocab else name
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
        return timed

    def __enter__(self):
        for n in self._names:
            setattr(self.backend, n, self._wrap(n, getattr(self.backend, n)))
        return self

    def __exit__(self, *exc):
        for n in self._names:
            self.backend.__dict__.pop(n, None)


def profile_decode(path: str, *, prompt_tokens: int, gen_tokens: int, threads: int, backend: str = "cpu") -> dict:
    """Milliseconds per token in each backend operation, for greedy decode after a prompt; plus the total
    and the share outside the backend's operations (Python, the recorder, the cache)."""
    import numba

    from engine.forward import forward
    from engine.kv_cache import KVCache
    from engine.model import load_model

    numba.set_num_threads(threads)
    model = load_model(path, with_tokenizer=False, backend=backend)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(model.config.vocab_size, 30000), size=prompt_tokens)
    cache = KVCache.for_model(model, prompt_tokens + gen_tokens + 1)
    logits = forward(model, prompt, cache)
    with OpTimer(model) as timer:
        t = time.perf_counter()
        for _ in range(gen_tokens):
            logits = forward(model, np.array([int(np.argmax(logits[-1]))]), cache)
        total = time.perf_counter() - t
    ms = {k: round(v / gen_tokens * 1e3, 3) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    ms["(outside the operations)"] = round((total - sum(timer.seconds.values())) / gen_tokens * 1e3, 3)
    return {"total_ms_per_token": round(total / gen_tokens * 1e3, 3), "ms_per_token": ms}


def profile_markdown(profile: dict) -> str:
    total = profile["total_ms_per_token"]
    out = ["", f"Where a decode step's time goes ({total:g} ms per token):", "", "| operation | ms per token | share |",
           "|---|---|---|"]
    for name, ms in profile["ms_per_token"].items():
        out.append(f"| {name} | {ms:g} | {100 * ms / total:.1f}% |")
    return "\n".join(out)


def bench_llama_cpp(path: str, *, prompt_tokens: int, gen_tokens: int, threads: int, repeats: int = 1) -> dict:
    """The same measurements with llama.cpp through llama-cpp-python, each speed the best of `repeats` runs."""
    from llama_cpp import Llama

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=prompt_tokens + gen_tokens + 8,
                    n_batch=max(prompt_tokens, 32), verbose=False)
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(0, min(llm.n_vocab(), 30000), size=prompt_tokens)]
        llm.eval(prompt[:4])
        n_vocab = llm.n_vocab()

        def last_logits() -> np.ndarray:  # llama-cpp-python keeps no scores without logits_all
            return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

        prefill = decode = 0.0
        for _ in range(repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            prefill = max(prefill, prompt_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                llm.eval([int(np.argmax(last_logits()))])
            decode = max(decode, gen_tokens / (time.perf_counter() - t0))
    import llama_cpp

    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "load_s": round(load_s, 3),
            "prefill_tok_s": round(prefill, 2), "decode_tok_s": round(decode, 2), "peak_rss_anon_mb": round(mem.peak, 1)}


def with_peer(result: BenchResult, peer: dict | None) -> BenchResult:
    result.peer = peer
    if peer:
        result.ratios = {"prefill": round(result.prefill_tok_s / peer["prefill_tok_s"], 3),
                         "decode": round(result.decode_tok_s / peer["decode_tok_s"], 3),
                         "decode_traced": round(result.decode_traced_tok_s / peer["decode_tok_s"], 3)}
        if result.decode_q8_tok_s is not None:
            result.ratios["decode_q8"] = round(result.decode_q8_tok_s / peer["decode_tok_s"], 3)
    return result


def markdown(r: BenchResult) -> str:
    p = r.peer or {}

    def cell(v):
        return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    rows = [("load s", r.load_s, p.get("load_s")), ("first-call compile s, cold cache", r.compile_cold_s, None),
            ("first-call compile s, warm cache", r.compile_warm_s, None),
            ("start to first token s, warm cache (imports, load, first forward)", r.start_to_first_token_warm_s, None),
            (f"prefill tok/s ({r.prompt_tokens} tokens)", r.prefill_tok_s, p.get("prefill_tok_s")),
            ("decode tok/s", r.decode_tok_s, p.get("decode_tok_s")),
            ("decode tok/s, 8-bit activations (`--backend cpu-q8`)", r.decode_q8_tok_s, p.get("decode_tok_s")),
            ("traced decode tok/s", r.decode_traced_tok_s, None),
            ("traced ÷ untraced decode", r.traced_over_untraced, None),
            ("kernel launches per decoded token", r.launches_per_token, None),
            ("peak anonymous memory MB", r.peak_rss_anon_mb, p.get("peak_rss_anon_mb"))]
    peer_name = p.get("engine", "llama.cpp (not installed: `pip install '.[peers]'`)")
    where = (f"backend {r.backend}" if r.backend == "cuda"
             else f"{r.threads} threads" + ("" if r.backend == "cpu" else f", backend {r.backend}"))
    if r.repeats > 1:
        where += f", speeds the best of {r.repeats} runs"
    out = [f"`trace bench {r.model}` — {r.file_gb} GB, {where}, {r.machine}", "",
           f"| figure | moe-workbench | {peer_name} | ratio |", "|---|---|---|---|"]
    ratio = {"prefill": r.ratios.get("prefill"), "decode": r.ratios.get("decode"), "decode_q8": r.ratios.get("decode_q8")}
    for name, ours, theirs in rows:
        if ours is None and name.startswith("decode tok/s, 8-bit"):
            continue  # measured beside a cpu run where this CPU can run it
        key = ("prefill" if name.startswith("prefill") else "decode" if name == "decode tok/s"
               else "decode_q8" if name.startswith("decode tok/s, 8-bit") else None)
        out.append(f"| {name} | {cell(ours)} | {cell(theirs)} | {cell(ratio.get(key)) if key else ''} |")
    if r.profile:
        out.append(profile_markdown(r.profile))
    return "\n".join(out)


BEGIN = "<!-- trace bench {name}: begin -->"
END = "<!-- trace bench {name}: end -->"


def _section(doc: Path, name: str) -> tuple[str, int, int]:
    text = doc.read_text()
    begin, end = BEGIN.format(name=name), END.format(name=name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise InputError(f"{doc} has no section marked '{begin}' ... '{end}'")
    return text, i + len(begin), j


def check_section(doc: Path, name: str) -> None:
    _section(doc, name)


def update_section(doc: Path, name: str, table: str) -> None:
    """Replace the text between the markers `<!-- trace bench NAME: begin -->` and `... end -->` in `doc`
    (written atomically). The docs' tables are generated here, never typed."""
    text, i, j = _section(doc, name)
    new = text[:i] + "\n" + table.strip() + "\n" + text[j:]
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


def to_json(r: BenchResult) -> str:
    return json.dumps(r.to_dict(), indent=1)
