"""Runs: browse the trace store; open, rename, delete, download."""

import json

import pandas as pd
import streamlit as st

from engine.errors import WorkbenchError
from traces.payload import dumps
from workbench.state import get_store
from workbench.view import from_run

st.title("Runs")
store = get_store()
st.caption(f"Store: {store.root} (set TRACE_STORE to use another folder; `trace ls` lists the same runs)")
runs = store.list()
if not runs:
    st.info("No runs yet: save one from the Trace page, use the Diff page's demo, or `trace run MODEL --prompt ...`.")
    st.stop()
table = pd.DataFrame([{"id": r.id, "status": r.status, "label": r.label, "model": r.model, "tokens": r.n_tokens,
                       "knobs": json.dumps(r.knobs), "created": r.created, "source": r.source} for r in runs])
st.dataframe(table, hide_index=True, key="runs_table")

ok = [r for r in runs if r.status == "ok"]
if not ok:
    st.warning("Every run in the store is damaged.")
    st.stop()
choice = st.selectbox("Run", range(len(ok)), format_func=lambda i: f"{ok[i].id} · {ok[i].label or ''}",
                      key="runs_pick")
run_id = ok[choice].id
c1, c2, c3 = st.columns(3)
if c1.button("Open in the workbench", key="runs_open"):
    st.session_state["view"] = from_run(store.load(run_id, vectors=False))
    st.session_state["view_model"] = None
    st.success("Opened: the Router and Logits pages now show this run.")
with c2:
    label = st.text_input("New label", ok[choice].label or "", key="runs_label")
    if st.button("Rename", key="runs_rename"):
        try:
            store.rename(run_id, label or None)
            st.rerun()
        except WorkbenchError as exc:
            st.error(str(exc))
if c3.button("Delete", key="runs_delete"):
    store.remove(run_id)
    st.rerun()
try:
    run = store.load(run_id, vectors=False)
    payload = run.to_payload(min(20, int(run.meta.get("top_k") or 20)))  # a run keeps what it was traced with
except WorkbenchError as exc:
    st.error(str(exc))
    st.stop()
st.download_button("Download payload JSON", dumps(payload), file_name=f"{run_id}.json", mime="application/json",
                   key="runs_download")
