"""The `trace` commands that work with the run store.

    trace run MODEL.gguf --prompt "What is 2+2?" [--chat] [--label before-fix] [--no-qk-norm] [--capture vectors]
                                     # stores a run; the last line of stdout is "run <RUN_ID>"
    trace ls [--json]                # runs, newest first; damaged ones flagged corrupt
    trace show RUN_ID [--json]       # per-layer std of each slot, growth, anomalies, top-k
    trace diff A B [--json] [--align prefix|last] [--band auto|numerical|quantization]
    trace label RUN_ID LABEL
    trace rm RUN_ID...

RUN_ID is an id, a unique prefix of one, or a unique label. Every command takes --store DIR (default: the
TRACE_STORE environment variable, else $XDG_DATA_HOME/moe-workbench/runs or ~/.local/share/moe-workbench/runs).
`trace export RUN_ID` is `export_run` below, called by the export command in traces/cli.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from engine.recorder import LAYER_SLOTS, STAT_FIELDS

from . import progress
from .cli import (backend_option, check_prompt_options, knob_options, load, main, make_knobs, prompt_options,
                  prompt_tokens, write_output)

STD = STAT_FIELDS.index("std_dev")
NAN = STAT_FIELDS.index("nan_count")
INF = STAT_FIELDS.index("inf_count")
STD_LEVELS = (100.0, 50.0, 10.0)  # upstream's flags: std above 10, 50, 100
MAX_PAYLOAD_BYTES = 1 << 30


def store_option(f):
    return click.option("--store", "store_dir", envvar="TRACE_STORE", show_envvar=True, default=None,
                        type=click.Path(file_okay=False),
                        help="Run store folder [default: $XDG_DATA_HOME/moe-workbench/runs, "
                             "or ~/.local/share/moe-workbench/runs].")(f)


def open_store(store_dir):
    from .store import Store

    return Store(store_dir)


@click.command("run")
@click.argument("model_path")
@prompt_options
@knob_options
@click.option("--label", default=None, help="A name for the run (trace ls shows it; commands accept it as RUN_ID).")
@click.option("--capture", type=click.Choice(["vectors"]), multiple=True,
              help="Also keep the hidden-state vectors of every slot (for cosines in trace diff).")
@click.option("--router-probs/--no-router-probs", default=None,
              help="Keep the full router softmax per position [default: when the model has <= 256 experts].")
@click.option("--top-k", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Top logits kept at every position.")
@store_option
@backend_option
def run_cmd(model_path, prompt, tokens, chat, system, no_qk_norm, rope_theta, no_norm_topk_prob, template, label,
            capture, router_probs, top_k, store_dir, backend):
    """Trace one forward pass over a prompt and store it as a run; prints "run <RUN_ID>"."""
    from .store import Run, check_label
    from .tracing import trace_tokens

    check_label(label)
    store = open_store(store_dir)
    knobs = make_knobs(no_qk_norm, rope_theta, no_norm_topk_prob, template)
    check_prompt_options(prompt, tokens, chat, default_prompt="What is 2+2?")
    model = load(model_path, backend)
    text, ids = prompt_tokens(model, prompt, tokens, chat, template, system, default_prompt="What is 2+2?")
    vectors = "vectors" in capture
    with progress.status(f"tracing {len(ids)} tokens (the first run compiles the kernels)"):
        rec = trace_tokens(model, ids, knobs=knobs, capture_vectors=vectors, top_k=top_k)
    with progress.status(f"storing in {store.root}"):
        run = Run.from_trace(model, rec, ids, prompt=text, knobs=knobs, label=label, router_probs=router_probs)
        run_id = store.save(run)
    click.echo(f"run {run_id}")


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@click.option("--verify", is_flag=True, help="Also check every table's sha256 (reads every file).")
@store_option
def ls_cmd(as_json, verify, store_dir):
    """List the stored runs, newest first; damaged runs are listed as corrupt."""
    store = open_store(store_dir)
    runs = store.list(verify=verify)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], ensure_ascii=False))
        return
    if not runs:
        click.echo(f"no runs in {store.root}", err=True)
        return
    click.echo(f"{'id':<22} {'label':<16} {'model':<22} {'tok':>5} {'source':<9} {'created':<20} knobs")
    for r in runs:
        if r.status != "ok":
            click.echo(f"{r.id:<22} CORRUPT: {r.error}")
            continue
        knobs = ",".join(f"{k}={v}" for k, v in r.knobs.items()) or "default"
        vec = " +vectors" if r.vectors else ""
        click.echo(f"{r.id:<22} {_cut(r.label or '', 16):<16} {_cut(r.model or '?', 22):<22} {r.n_tokens:>5} "
                   f"{r.source or '?':<9} {(r.created or '')[:19].replace('T', ' '):<20} {knobs}{vec}")


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def summarize(run) -> dict:
    """What `trace show` prints: std of every slot per layer (last position), growth, anomalies, top-k."""
    L = run.n_layers
    std = {}
    for slot in LAYER_SLOTS:
        col = []
        for i in range(L):
            s = run.stats(i, slot)
            col.append(None if s is None else _num(s.stats[-1, STD]))
        std[slot] = col
    growth = {slot: (col[-1] / col[0] if col and col[0] and col[-1] is not None else None)
              for slot, col in std.items()}
    anomalies = []
    for (layer, slot), s in run.activations.items():
        nonfinite = s.stats[:, NAN] + s.stats[:, INF]
        if nonfinite.any():
            j = int(np.flatnonzero(nonfinite)[0])
            anomalies.append({"layer": layer, "slot": slot, "kind": "nonfinite",
                              "nan_count": int(s.stats[:, NAN].sum()), "inf_count": int(s.stats[:, INF].sum()),
                              "first_position": int(s.positions[j])})
        stds = np.nan_to_num(s.stats[:, STD], nan=-1.0)
        j = int(np.argmax(stds))
        for level in STD_LEVELS:
            if stds[j] > level:
                anomalies.append({"layer": layer, "slot": slot, "kind": f"std > {level:g}", "std": float(stds[j]),
                                  "position": int(s.positions[j])})
                break
    lg = run.logits
    top = [{"token_id": int(lg.ids[-1, j]), "text": lg.texts[-1][j], "prob": _num(lg.probs[-1, j]),
            "logit": _num(lg.logits[-1, j])} for j in range(min(10, lg.ids.shape[1]))]
    m = run.meta
    return {"id": run.id, "label": run.label, "source": run.source, "created": m.get("created"),
            "model": m["model"], "prompt": m.get("prompt"), "tokens": len(run.tokens),
            "knobs": m.get("knobs"), "captured": m.get("captured"), "std_last_position": std,
            "growth_last_over_first": growth, "anomalies": anomalies, "top_k_last_position": top}


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None


def _f(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}")


def render_summary(s: dict) -> str:
    from .store import changed_knobs

    lines = [f"run {s['id']}" + (f"  [{s['label']}]" if s["label"] else "") + f"  {s['source']}  {s['created']}",
             f"model: {s['model'].get('name')} ({s['model'].get('path')}), {s['tokens']} tokens, knobs: "
             + (", ".join(f"{k}={v}" for k, v in changed_knobs(s["knobs"]).items()) or "default")]
    if s["prompt"] is not None:
        lines.append(f"prompt: {s['prompt'][:200]!r}")
    lines.append("std_dev at the last position")
    lines.append(f"{'layer':>5}  " + "  ".join(f"{slot:>10}" for slot in LAYER_SLOTS))
    L = len(next(iter(s["std_last_position"].values())))
    for i in range(L):
        lines.append(f"{i:>5}  " + "  ".join(f"{_f(s['std_last_position'][slot][i]):>10}" for slot in LAYER_SLOTS))
    lines.append(f"{'growth':>5}  " + "  ".join(f"{_f(s['growth_last_over_first'][slot]):>10}"
                                               for slot in LAYER_SLOTS) + "   (last layer / first layer)")
    if s["anomalies"]:
        lines.append("anomalies:")
        for a in s["anomalies"]:
            where = a["slot"] if a["layer"] is None else f"layer {a['layer']} {a['slot']}"
            if a["kind"] == "nonfinite":
                lines.append(f"  {where}: {a['nan_count']} NaN, {a['inf_count']} Inf (first at position "
                             f"{a['first_position']})")
            else:
                lines.append(f"  {where}: {a['kind']} ({_f(a['std'])} at position {a['position']})")
    else:
        lines.append("anomalies: none (no NaN/Inf, no std above 10)")
    lines.append("top-k at the last position:")
    for t in s["top_k_last_position"]:
        text = repr(t["text"]) if t["text"] is not None else ""
        lines.append(f"  {t['token_id']:>7} {text:<20} p={_f(t['prob'])}  logit={_f(t['logit'])}")
    return "\n".join(lines)


@click.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON.")
@store_option
def show_cmd(run_id, as_json, store_dir):
    """Summarise a run: per-layer std of each slot, growth, anomalies (NaN/Inf, std > 10/50/100), top-k."""
    run = open_store(store_dir).load(run_id, vectors=False)
    s = summarize(run)
    click.echo(json.dumps(s, ensure_ascii=False, allow_nan=False) if as_json else render_summary(s))


def load_trace(ref: str, store):
    """A stored run by RUN_ID, or an exported payload JSON file."""
    from engine.errors import InputError

    from .store import Run

    path = Path(ref)
    if path.is_file():
        if path.stat().st_size > MAX_PAYLOAD_BYTES:
            raise InputError(f"{ref}: larger than {MAX_PAYLOAD_BYTES >> 20} MiB, not a trace payload")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{ref}: not a JSON trace payload ({exc})") from None
        return Run.from_payload(payload)
    return store.load(ref)


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout: first_divergence, layers, router, logits.")
@click.option("--align", type=click.Choice(["prefix", "last"]), default=None,
              help="Traces over different tokens: compare the common prefix, or the last positions only.")
@click.option("--band", type=click.Choice(["auto", "numerical", "quantization"]), default="auto", show_default=True,
              help="Tolerance band: numerical (same weights), quantization (different files); auto decides by "
                   "the model files' fingerprints.")
@store_option
def diff_cmd(a, b, as_json, align, band, store_dir):
    """Compare trace B with trace A (run ids or payload JSON files) and name the first divergence."""
    from .diff import diff_runs

    store = open_store(store_dir)
    run_a, run_b = load_trace(a, store), load_trace(b, store)
    d = diff_runs(run_a, run_b, align=align, band=band)
    click.echo(json.dumps(d.to_json(), ensure_ascii=False, allow_nan=False) if as_json else d.to_text())


@click.command("rm")
@click.argument("run_ids", nargs=-1, required=True)
@store_option
def rm_cmd(run_ids, store_dir):
    """Delete stored runs (corrupt ones too)."""
    store = open_store(store_dir)
    for ref in run_ids:
        click.echo(f"removed {store.remove(ref)}")


@click.command("label")
@click.argument("run_id")
@click.argument("label")
@store_option
def label_cmd(run_id, label, store_dir):
    """Set a run's label (an empty LABEL clears it)."""
    store = open_store(store_dir)
    rid = store.resolve(run_id)
    store.rename(rid, label or None)
    click.echo(f"labelled {rid}")


def is_run_ref(source: str) -> bool:
    """For `trace export SOURCE`: a run id or label, not a model file (no such file, no .gguf suffix)."""
    return not Path(source).exists() and not source.lower().endswith(".gguf")


def export_run(run_id: str, store, top_k: int, output: str) -> None:
    """`trace export RUN_ID`: the stored run's payload, the same JSON `trace export MODEL` writes.

    store: a traces.store.Store, or a folder (None: the default store)."""
    from .payload import dumps
    from .store import Store

    if not isinstance(store, Store):
        store = Store(store)
    run = store.load(run_id, vectors=False)
    write_output(dumps(run.to_payload(top_k)), output)


@click.command("reference")
@click.argument("model_path")
@prompt_options
@click.option("--rope-theta", type=float, default=None, help="Build the reference with this rope base.")
@click.option("--no-norm-topk-prob", is_flag=True, help="Build the reference without renormalising top-k weights.")
@click.option("--template", type=click.Choice(["auto", "chatml", "qwen3-nothink", "raw"]), default="auto",
              show_default=True, help="Chat template used with --chat.")
@click.option("--label", default=None, help="A name for the run.")
@store_option
def reference_cmd(model_path, prompt, tokens, chat, system, rope_theta, no_norm_topk_prob, template, label, store_dir):
    """Run the same tokens through Hugging Face Qwen3MoeForCausalLM (torch, float32) built from the file's
    dequantized tensors, and store it as a run (source 'reference'); prints "run <RUN_ID>".

    Needs the `reference` extra. `trace diff <engine run> <reference run>` is the per-layer bisection."""
    from .reference import build_hf_model, run_reference
    from .store import Run, check_label

    check_label(label)
    store = open_store(store_dir)
    knobs = make_knobs(False, rope_theta, no_norm_topk_prob, template)
    check_prompt_options(prompt, tokens, chat, default_prompt="What is 2+2?")
    model = load(model_path)
    text, ids = prompt_tokens(model, prompt, tokens, chat, template, system, default_prompt="What is 2+2?")
    with progress.status("building the Hugging Face reference (dequantizing with gguf-py)"):
        hf = build_hf_model(model, rope_theta=rope_theta, norm_topk_prob=not no_norm_topk_prob)
    with progress.status(f"running {len(ids)} tokens through transformers"):
        out = run_reference(hf, ids)
    with progress.status(f"storing in {store.root}"):
        run_id = store.save(Run.from_reference(model, ids, out, prompt=text, knobs=knobs, label=label))
    click.echo(f"run {run_id}")


COMMANDS = (run_cmd, ls_cmd, show_cmd, diff_cmd, rm_cmd, label_cmd, reference_cmd)


def register(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)


register(main)
