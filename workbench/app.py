"""The workbench entry point: routing only. Run with `streamlit run workbench/app.py` (or `make app`)."""

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run workbench/app.py` from a checkout
    sys.path.insert(0, str(ROOT))

st.set_page_config(page_title="MoE workbench", layout="wide")

PAGES = Path(__file__).resolve().parent / "app_pages"
st.navigation([
    st.Page(PAGES / "trace.py", title="Trace", icon=":material/timeline:", default=True),
    st.Page(PAGES / "router.py", title="Router", icon=":material/alt_route:"),
    st.Page(PAGES / "logits.py", title="Logits", icon=":material/bar_chart:"),
    st.Page(PAGES / "generate.py", title="Generate", icon=":material/edit_note:"),
    st.Page(PAGES / "diff.py", title="Diff", icon=":material/compare_arrows:"),
    st.Page(PAGES / "runs.py", title="Runs", icon=":material/folder_open:"),
]).run()
