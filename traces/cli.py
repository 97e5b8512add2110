"""The `trace` command line.

    trace export MODEL.gguf --prompt "What is 2+2?" -o trace.json
    trace export MODEL.gguf --tokens 3838,374,220,17 --top-k 20 -o -
    trace generate MODEL.gguf --prompt "Write fizzbuzz" --chat --temperature 0.7 --seed 42
    trace export MODEL.gguf --prompt "What is 2+2?" --backend cuda    # the same forward on a GPU
    trace synth --shape qwen3-30b-a3b --layers 4 -o bench.gguf

stdout carries only the result (JSON, generated text); progress and errors go to stderr.
Exit codes: 0 success, 1 a clear error about the input, 2 wrong usage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.errors import WorkbenchError

from . import progress


class _Group(click.Group):
    """Turns input errors into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def main(quiet: bool):
    """Trace, generate with and inspect qwen3_moe GGUF models."""
    progress.set_quiet(quiet)


def knob_options(f):
    """The knobs that reproduce upstream bugs; all off by default (the correct model)."""
    f = click.option("--template", type=click.Choice(["auto", "chatml", "qwen3-nothink", "raw"]), default="auto",
                     show_default=True, help="Chat template used with --chat.")(f)
    f = click.option("--no-norm-topk-prob", is_flag=True, help="Do not renormalise the top-k routing weights.")(f)
    f = click.option("--rope-theta", type=float, default=None, help="Override the file's rope base.")(f)
    f = click.option("--no-qk-norm", is_flag=True, help="Skip the per-head Q/K RMSNorm (the upstream bug).")(f)
    return f


def prompt_options(f):
    f = click.option("--system", default=None, help="System message (with --chat).")(f)
    f = click.option("--chat", is_flag=True, help="Wrap the prompt in the chat template as a user turn.")(f)
    f = click.option("--tokens", default=None, help="Comma-separated token ids instead of a prompt.")(f)
    f = click.option("--prompt", default=None, help="Prompt text.")(f)
    return f


def make_knobs(no_qk_norm, rope_theta, no_norm_topk_prob, template):
    from engine.config import Knobs

    return Knobs(qk_norm=not no_qk_norm, rope_theta=rope_theta, norm_topk_prob=not no_norm_topk_prob,
                 template=template)


def backend_option(f):
    from engine.config import BACKEND_HELP, BACKENDS

    return click.option("--backend", type=click.Choice(BACKENDS), default="cpu", show_default=True,
                        help=BACKEND_HELP)(f)


def load(model_path: str, backend: str = "cpu"):
    from engine.model import load_model

    if backend != "cuda":
        with progress.status(f"loading {Path(model_path).name}"):
            return load_model(model_path, backend=backend)
    return load_model(model_path, backend=backend, progress=progress.bar(f"copying {Path(model_path).name} to the GPU"))


def check_prompt_options(prompt, tokens, chat, *, default_prompt=None) -> list[int] | None:
    """What can be checked before the model is loaded (a large file takes a while): the --prompt/--tokens
    combination and the syntax of --tokens. Returns the parsed ids, or None for a prompt."""
    from engine.errors import InputError
    from engine.session import parse_token_list

    if prompt is not None and tokens is not None:
        raise InputError("give --prompt or --tokens, not both")
    if tokens is not None:
        if chat:
            raise InputError("--chat needs --prompt, not --tokens")
        return parse_token_list(tokens)
    if prompt is None and default_prompt is None:
        raise InputError("give --prompt or --tokens")
    return None


def prompt_tokens(model, prompt, tokens, chat, template, system, *, default_prompt=None):
    """(prompt text or None, token ids), the ids checked against the model's vocabulary and context."""
    from engine.session import check_tokens, encode_prompt

    ids = check_prompt_options(prompt, tokens, chat, default_prompt=default_prompt)
    if ids is None:
        prompt = default_prompt if prompt is None else prompt
        ids = encode_prompt(model, prompt, chat=chat, template=template, system=system)
    check_tokens(model, ids)  # before any "tracing"/"prefill" progress line and before the kernels load
    return prompt if tokens is None else None, ids


def write_output(text: str, output: str) -> None:
    if output == "-":
        sys.stdout.write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    path = Path(output)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("source")
@prompt_options
@knob_options
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True, help="Top logits to list.")
@click.option("-o", "--output", default="-", show_default=True, help="Output file, or - for stdout.")
@click.option("--store", "store_dir", envvar="TRACE_STORE", default=None, type=click.Path(file_okay=False),
              help="Run store, when SOURCE is a RUN_ID.")
@backend_option
def export(source, prompt, tokens, chat, system, no_qk_norm, rope_theta, no_norm_topk_prob, template, top_k, output,
           store_dir, backend):
    """Write the JSON payload of one traced forward pass.

    SOURCE is a model file (traced now, over --prompt or --tokens) or a stored RUN_ID (its payload, the
    same JSON the model would give for the same tokens and knobs)."""
    from engine.errors import InputError
    from traces.payload import dumps
    from traces.tracing import trace_payload

    from .cli_runs import export_run, is_run_ref

    if is_run_ref(source):
        if prompt is not None or tokens is not None or chat or no_qk_norm or rope_theta is not None \
                or no_norm_topk_prob or template != "auto" or backend != "cpu":
            raise InputError("a stored run is exported as it was traced: drop the prompt, tokens, knob and "
                             "backend options")
        return export_run(source, store_dir, top_k, output)
    knobs = make_knobs(no_qk_norm, rope_theta, no_norm_topk_prob, template)
    check_prompt_options(prompt, tokens, chat, default_prompt="What is 2+2?")
    model = load(source, backend)
    text, ids = prompt_tokens(model, prompt, tokens, chat, template, system, default_prompt="What is 2+2?")
    with progress.status(f"tracing {len(ids)} tokens (the first run compiles the kernels)"):
        payload = trace_payload(model, ids, prompt=text, knobs=knobs, top_k=top_k)
    write_output(dumps(payload), output)


def sampling_options(f):
    from engine.sampler import SamplingParams

    d = SamplingParams()
    f = click.option("--stop", multiple=True, help="Stop string (repeatable).")(f)
    f = click.option("--max-tokens", type=int, default=d.max_tokens, show_default=True)(f)
    f = click.option("--seed", type=int, default=None, help="Seed of the sampler's generator.")(f)
    f = click.option("--repeat-last-n", type=int, default=d.repeat_last_n, show_default=True)(f)
    f = click.option("--repeat-penalty", type=float, default=d.repeat_penalty, show_default=True)(f)
    f = click.option("--min-p", type=float, default=d.min_p, show_default=True)(f)
    f = click.option("--top-p", type=float, default=d.top_p, show_default=True)(f)
    f = click.option("--top-k", type=int, default=d.top_k, show_default=True)(f)
    f = click.option("--temperature", type=float, default=d.temperature, show_default=True)(f)
    return f


@main.command()
@click.argument("model_path")
@prompt_options
@knob_options
@sampling_options
@backend_option
def generate(model_path, prompt, tokens, chat, system, no_qk_norm, rope_theta, no_norm_topk_prob, template,
             temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens, stop, backend):
    """Generate text, streaming each token to stdout as it is produced."""
    from engine.generate import Generation, generate as run
    from engine.sampler import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                            max_tokens=max_tokens, stop=tuple(stop))
    knobs = make_knobs(no_qk_norm, rope_theta, no_norm_topk_prob, template)
    check_prompt_options(prompt, tokens, chat)
    model = load(model_path, backend)
    _, ids = prompt_tokens(model, prompt, tokens, chat, template, system)
    tok = model.tokenizer
    res = Generation(prompt_ids=list(ids))
    printed = ""
    progress_msg = "prefill (the first run compiles the kernels)"
    if not progress._quiet:
        click.echo(f"{progress_msg} ...", err=True)
    for step in run(model, ids, params, knobs=knobs, result=res):
        if tok is None:
            sys.stdout.write(f"{step.token_id} ")
        else:
            text = tok.decode(res.token_ids)
            if step.finish == "stop_string":
                cut = min(text.find(s) for s in params.stop if s in text)
                text = text[:cut]
            elif step.finish == "stop_token":
                text = tok.decode(res.token_ids[:-1])
            stable = text if step.finish else text.rstrip("\ufffd")
            if stable.startswith(printed):
                sys.stdout.write(stable[len(printed):])
                printed = stable
        sys.stdout.flush()
    sys.stdout.write("\n")
    n = len(res.token_ids)
    if not progress._quiet:
        rate = (n - 1) / res.decode_seconds if n > 1 and res.decode_seconds > 0 else float("nan")
        click.echo(
            f"{n} tokens, finish: {res.finish}; prefill {len(ids)} tokens in {res.prefill_seconds:.2f} s, "
            f"decode {rate:.1f} tok/s",
            err=True,
        )


@main.command()
@click.option("--shape", type=click.Choice(["tiny", "qwen3-30b-a3b"]), default="tiny", show_default=True,
              help="tiny: a small test model; qwen3-30b-a3b: the real model's shapes with random blocks.")
@click.option("--layers", type=click.IntRange(1, 512), default=None, help="Number of layers.")
@click.option("--qtype", default=None, help="F32, F16, BF16, Q8_0, Q4_K, Q5_K, Q6_K or Q4_K_M.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
def synth(shape, layers, qtype, seed, output):
    """Write a synthetic qwen3moe GGUF file (random weights) for tests and benchmarks."""
    import dataclasses

    from engine.synth import SynthSpec, shape_spec, write_model

    spec = shape_spec(shape, layers) if shape != "tiny" else SynthSpec(n_layers=layers or 2)
    changes = {"seed": seed}
    if qtype:
        changes["qtype"] = qtype
    spec = dataclasses.replace(spec, **changes)
    write_model(output, spec, progress=progress.bar(f"writing {output}"))
    size = Path(output).stat().st_size
    click.echo(f"wrote {output} ({size / 1e9:.2f} GB)", err=True)


@main.command()
@click.argument("model_path")
@click.option("--prompt-tokens", type=click.IntRange(1, 32768), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Numba threads [default: all cores].")
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Measure each speed this many times and keep the best, for both engines (shared machines only "
                   "ever slow a run down).")
@click.option("--peer", type=click.Choice(["llama.cpp", "none"]), default="llama.cpp", show_default=True,
              help="Also measure llama.cpp (llama-cpp-python) on the same file in the same run, when installed.")
@click.option("--no-compile-times", is_flag=True, help="Skip the cold/warm first-call measurements.")
@click.option("--profile", is_flag=True, help="Also time each operation of a decode step (a second table).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--markdown", "as_markdown", is_flag=True, help="A Markdown table on stdout (for the docs).")
@click.option("--update", "update_docs", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Also write the table into this Markdown file, between the markers "
                   "'<!-- trace bench NAME: begin -->' and '<!-- trace bench NAME: end -->' (repeatable).")
@click.option("--section", default="cpu", show_default=True, help="NAME of the marked section --update replaces.")
@backend_option
def bench(model_path, prompt_tokens, gen_tokens, threads, repeats, peer, no_compile_times, profile, as_json, as_markdown,
          update_docs, section, backend):
    """Measure load, compile, prefill, decode and traced decode speed and peak memory, beside llama.cpp."""
    import os

    from engine.backend import check_available
    from engine.gguf_file import open_gguf

    from . import bench as B

    open_gguf(model_path)  # a clear error for a bad file before anything is timed
    for doc in update_docs:
        B.check_section(doc, section)
    if backend == "cuda" and profile:
        from engine.errors import InputError

        raise InputError("--profile times the CPU backend's operations; drop it with --backend cuda")
    check_available(backend)  # a one-line error when it cannot run here, before anything is timed
    threads = threads or os.cpu_count() or 1
    with progress.status(f"benchmarking moe-workbench ({backend})"):
        result = B.bench_engine(model_path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, threads=threads,
                                compile_times=not no_compile_times, backend=backend, repeats=repeats,
                                progress=lambda m: None if progress._quiet else click.echo(f"  {m}", err=True))
    peer_result = None
    if peer == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            click.echo("llama-cpp-python is not installed (pip install '.[peers]'): no peer figures", err=True)
        else:
            with progress.status("benchmarking llama.cpp on the same file"):
                peer_result = B.bench_llama_cpp(model_path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                                threads=threads, repeats=repeats)
    result = B.with_peer(result, peer_result)
    if profile:
        with progress.status("timing each operation of a decode step"):
            result.profile = B.profile_decode(model_path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                              threads=threads, backend=backend)
    table = B.markdown(result)
    for doc in update_docs:
        B.update_section(doc, section, table)
        click.echo(f"updated {doc}", err=True)
    click.echo(B.to_json(result) if as_json else table)


from . import cli_runs  # noqa: E402,F401  (registers run, ls, show, diff, rm, label, reference)
