"""Diff: two traces side by side, and the first layer where they part."""

import json

import numpy as np
import pandas as pd
import streamlit as st

from contracts import validate_payload
from engine.config import Knobs
from engine.errors import WorkbenchError
from traces.diff import diff_runs
from traces.store import Run
from workbench import analysis, charts
from workbench.state import DEFAULT_PROMPT, get_store, model_picker, save_live_trace
from workbench.view import from_run

MAX_UPLOAD = 20 * 1024 * 1024  # also .streamlit/config.toml's server.maxUploadSize (MB), which the server enforces


def brief(exc, limit: int = 300) -> str:
    """An error about an upload, on one line and short (a schema error quotes the offending value in full)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


st.title("Diff")
st.caption("Before and after a fix: the earliest layer and slot where two traces leave the tolerance band.")

store = get_store()
mode = st.radio("Compare", ["before/after demo", "stored runs", "uploaded payloads"], horizontal=True,
                key="diff_mode")
a = b = None
if mode == "before/after demo":
    with st.sidebar:
        path = model_picker("diff_model")
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="diff_prompt", height=100)
    st.write("Runs the prompt twice on the same model: A with the per-head Q/K RMSNorm off (the upstream bug), "
             "B with it on (the fix), stores both runs and diffs them.")
    if st.button("Run before/after", type="primary", key="diff_demo"):
        with st.spinner("Tracing before and after…"):
            ida = save_live_trace(path, prompt, False, Knobs(qk_norm=False), "before: no qk-norm")
            idb = save_live_trace(path, prompt, False, Knobs(), "after: qk-norm")
        st.session_state["diff_pair"] = (ida, idb)
    pair = st.session_state.get("diff_pair")
    if pair:
        a, b = store.load(pair[0]), store.load(pair[1])
elif mode == "stored runs":
    runs = [r for r in store.list() if r.status == "ok"]
    if len(runs) < 2:
        st.info("The store has fewer than two runs: use the demo, `trace run`, or the Trace page's save button.")
    else:
        labels = [f"{r.id} · {r.label or ''} · {r.model} · {(r.created or '')[:19]}" for r in runs]
        ia = st.selectbox("A", range(len(runs)), format_func=lambda i: labels[i], index=1, key="diff_a")
        ib = st.selectbox("B", range(len(runs)), format_func=lambda i: labels[i], index=0, key="diff_b")
        a, b = store.load(runs[ia].id), store.load(runs[ib].id)
else:
    files = [st.file_uploader(f"Payload {n}", type=["json"], key=f"diff_upload_{n}") for n in ("A", "B")]
    if all(files):
        loaded = []
        for f in files:
            if f.size > MAX_UPLOAD:
                st.error(f"{f.name}: {f.size} bytes is over the {MAX_UPLOAD} byte limit")
                st.stop()
            try:
                payload = json.loads(f.getvalue().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                st.error(f"{f.name}: not JSON ({brief(exc)})")
                st.stop()
            try:
                validate_payload(payload)
            except Exception as exc:  # jsonschema.ValidationError and friends: the upload does not fit the schema
                where = "/".join(str(p) for p in getattr(exc, "absolute_path", ())) or "the top level"
                st.error(f"{f.name}: does not match the trace payload schema at {where}: "
                         f"{brief(getattr(exc, 'message', exc))}")
                st.stop()
            try:
                loaded.append(Run.from_payload(payload))
            except WorkbenchError as exc:  # schema-valid, but not self-consistent
                st.error(f"{f.name}: {brief(exc)}")
                st.stop()
        a, b = loaded

if a is None or b is None:
    st.stop()
align = st.selectbox("Align", ["exact tokens", "prefix", "last"], key="diff_align")
try:
    d = diff_runs(a, b, align=None if align == "exact tokens" else align)
except WorkbenchError as exc:
    st.error(str(exc))
    st.stop()
out = d.to_json()
st.session_state["diff_result"] = out
fd = out["first_divergence"]
if fd is None:
    st.success(f"No divergence ({out['verdict']}). {out['message']}")
else:
    st.error(f"First divergence: layer {fd['layer']}, slot {fd['slot']} — {fd['metric']} = {fd['value']:.4g} "
             f"(tolerance {fd['tolerance']:.4g}). {out['message']}")

va, vb = from_run(a), from_run(b)
slot = st.selectbox("Slot", ["output", "attn_out", "ffn_out", "qkv", "attn_norm", "ffn_norm"], key="diff_slot")
st.plotly_chart(charts.overlay_std_growth(va.std_last(), vb.std_last(), names=("A", "B"), slots=(slot,),
                                          first_divergence=fd["layer"] if fd else None), width="stretch",
                key="diff_overlay")

rows = pd.DataFrame(out["layers"])
cols = [c for c in ("layer", "slot", "status", "std_a", "std_b", "std_ratio", "mean_diff", "cosine_min") if c in rows]
table = rows[cols]


def mark(row):
    hit = fd is not None and row["layer"] == fd["layer"] and row["slot"] == fd["slot"]
    return ["background-color: #ffd6d6" if hit else ""] * len(row)


st.dataframe(table.style.apply(mark, axis=1), hide_index=True, key="diff_table")

if va.selected.size and vb.selected.size and va.selected.shape[1] == vb.selected.shape[1]:
    st.plotly_chart(charts.flip_heatmap(analysis.flip_matrix(va.selected, vb.selected)), width="stretch",
                    key="diff_flips")
c1, c2 = st.columns(2)
c1.plotly_chart(charts.topk_bars(va.top_texts[:10], va.top_probs[:10], title="A: top-k"), width="stretch",
                key="diff_topk_a")
c2.plotly_chart(charts.topk_bars(vb.top_texts[:10], vb.top_probs[:10], title="B: top-k"), width="stretch",
                key="diff_topk_b")
lg = out["logits"]
st.caption(f"Top-k overlap and KL: {json.dumps({k: v for k, v in lg.items() if not isinstance(v, list)})}")
