"""Logits: the top-k next tokens, and the logit lens across layers."""

import numpy as np
import pandas as pd
import streamlit as st

from traces.lens import logit_lens
from workbench import charts
from workbench.state import current_view, get_model

st.title("Logits")
view = current_view()
st.caption(f"{view.model_name} · last position of {len(view.tokens)} tokens")

st.plotly_chart(charts.topk_bars(view.top_texts, view.top_probs), width="stretch", key="topk_chart")
st.dataframe(pd.DataFrame({"rank": range(1, len(view.top_ids) + 1), "token_id": view.top_ids,
                           "text": view.top_texts, "logit": view.top_logits, "prob": view.top_probs}),
             hide_index=True)

st.subheader("Logit lens")
st.caption("The final norm and lm_head applied to each layer's output at the last position: what the model "
           "would say if it stopped there, and where the final answer ranks.")
path = st.session_state.get("view_model")
if not view.lens_outputs or path is None:
    st.info("The logit lens needs a live trace (run one on the Trace page).")
    st.stop()
model = get_model(path)
answer = view.top_ids[0]
rows = logit_lens(model, np.stack([view.lens_outputs[i] for i in sorted(view.lens_outputs)]), answer)
tok = model.tokenizer
st.dataframe(pd.DataFrame([{
    "layer": r.layer, "top-1 token": tok.token_text(r.top_id) if tok else str(r.top_id), "top-1 prob": r.top_prob,
    f"rank of {view.top_texts[0]!r}": r.answer_rank, f"prob of {view.top_texts[0]!r}": r.answer_prob,
} for r in rows]), hide_index=True)
st.plotly_chart(charts.series_over_steps({"rank of final answer": [r.answer_rank for r in rows]},
                                         title="Rank of the final answer per layer", y_title="rank",
                                         x_title="layer"),
                width="stretch", key="lens_chart")
