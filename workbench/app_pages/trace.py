"""Trace: run a prompt through the model and watch the activation statistics grow across layers."""

import json

import pandas as pd
import streamlit as st

from engine.recorder import LAYER_SLOTS
from workbench import charts
from workbench.state import DEFAULT_PROMPT, backend_picker, knob_controls, knob_items, model_picker, trace_view

st.title("Trace")
st.caption("One forward pass with a recorder: per-layer statistics of every slot, where the std grows, "
           "and what defaults the file left to us.")

with st.sidebar:
    path = model_picker()
    backend = backend_picker("trace_backend")
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="trace_prompt", height=120)
    chat = st.toggle("Chat template", value=False, key="trace_chat")
    knobs = knob_controls("trace_")
    st.button("Run", type="primary", key="trace_run", width="stretch")

with st.spinner("Tracing (the first run compiles the kernels)…"):
    view = trace_view(path, prompt, chat, knob_items(knobs), backend)
st.session_state["view"] = view
st.session_state["view_model"] = path

left, right = st.columns([3, 1])
with right:
    log_y = st.toggle("Log scale", value=True, key="trace_log")
    where = st.radio("Std at", ["last position", "mean over positions"], key="trace_where")
std = view.std_last() if where == "last position" else view.std_mean()
nonfinite = view.nonfinite_last()
with left:
    st.plotly_chart(charts.std_growth(std, log_y=log_y, nonfinite_by_slot=nonfinite), width="stretch",
                    key="std_growth_chart")

growth = charts.growth_factors(std)
st.subheader("Growth factor (std at the last layer ÷ std at the first)")
st.dataframe(pd.DataFrame([growth]), hide_index=True)

rows = charts.anomalies(view.std_last(), nonfinite)
st.subheader("Anomalies")
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.success("No NaN/Inf, and no layer std above 10 (the upstream thresholds are 10, 50, 100).")

slot = st.selectbox("Heatmap slot", LAYER_SLOTS, index=LAYER_SLOTS.index("output"), key="trace_heat_slot")
st.plotly_chart(charts.layer_position_heatmap(view.std_grid(slot), view.token_texts, title=f"{slot} std"),
                width="stretch", key="heatmap_chart")

with st.expander("Tokens"):
    st.dataframe(pd.DataFrame({"position": range(len(view.tokens)), "id": view.tokens, "text": view.token_texts}),
                 hide_index=True)
with st.expander("Model config and the defaults used"):
    cfg = dict(view.config)
    sources = cfg.pop("sources", {})
    st.dataframe(pd.DataFrame([{"field": k, "value": str(v), "from": sources.get(k, "")} for k, v in cfg.items()]),
                 hide_index=True)
    used = sorted(k for k, v in sources.items() if v == "default")
    st.write("Defaults used (not in the file): " + (", ".join(used) if used else "none"))
    st.write("Knobs: " + ", ".join(f"{k}={v}" for k, v in view.knobs.items()))

if view.payload is not None:
    st.download_button("Download trace JSON", json.dumps(view.payload, indent=1, allow_nan=False),
                       file_name="trace.json", mime="application/json", key="trace_download")

with st.form("trace_save"):
    label = st.text_input("Label", "", key="trace_label")
    if st.form_submit_button("Save to the store"):
        from workbench.state import save_live_trace

        run_id = save_live_trace(path, prompt, chat, knobs, label, backend)
        st.success(f"Stored as run {run_id} (see the Runs page, or `trace show {run_id}`).")
