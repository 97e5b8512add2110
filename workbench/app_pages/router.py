"""Router: which experts each layer picks, how evenly, and how close the choices were."""

import numpy as np
import pandas as pd
import streamlit as st

from workbench import analysis, charts
from workbench.state import current_view

st.title("Router")
view = current_view()
st.caption(f"{view.model_name} · {len(view.tokens)} tokens · prompt {view.prompt!r}")
if view.selected.size == 0:
    st.info("This trace carries no router choices.")
    st.stop()

n_experts = int(view.config.get("n_experts") or (view.probs.shape[-1] if view.probs is not None else
                                                   int(view.selected.max()) + 1))
k = view.selected.shape[-1]
counts = analysis.selection_counts(view.selected, n_experts)
weights = analysis.mean_weights(view.selected, view.weights, n_experts)

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.expert_heatmap(counts, title="Selections per layer and expert", colorbar="count"),
                    width="stretch", key="router_counts")
with c2:
    st.plotly_chart(charts.expert_heatmap(weights, title="Mean routing weight when selected", colorbar="weight"),
                    width="stretch", key="router_weights")

st.plotly_chart(charts.token_layer_experts(view.selected, view.weights, view.token_texts),
                width="stretch", key="router_tokens")

imbalance = analysis.load_imbalance(counts)
spec = analysis.specialisation(counts)
if view.probs is not None:
    entropy = analysis.router_entropy(view.probs).mean(axis=1)
    margin = analysis.topk_margin(view.probs, k)
    st.plotly_chart(charts.router_health(entropy, imbalance, margin.mean(axis=1)), width="stretch",
                    key="router_health")
    fragile = np.argwhere(margin < 0.01)
    table = pd.DataFrame({"layer": range(view.n_layers), "entropy (nats)": entropy,
                          "max entropy": np.log(n_experts), "load imbalance": imbalance,
                          "specialisation": spec, "mean top-k margin": margin.mean(axis=1),
                          "fragile positions (margin < 0.01)": [(fragile[:, 0] == i).sum() for i in range(view.n_layers)]})
else:
    table = pd.DataFrame({"layer": range(view.n_layers), "load imbalance": imbalance, "specialisation": spec})
st.subheader("Per layer")
st.dataframe(table, hide_index=True)
st.caption("Specialisation: 1 − normalised entropy of the expert load (0 = every expert used equally). "
           "Top-k margin: p_k − p_(k+1); a small margin means a tiny change flips the choice.")
