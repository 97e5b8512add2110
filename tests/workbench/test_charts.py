"""Chart builders are pure functions: arrays in, Plotly figures out. Small and 48 x 128 x 512-sized inputs."""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
import pytest

from workbench import analysis, charts

SLOTS = charts.SLOTS


def synthetic(L, P, E, k, seed=0):
    rng = np.random.default_rng(seed)
    std = {s: np.exp(np.linspace(0, 3, L)) * (1 + 0.1 * rng.random(L)) for s in SLOTS}
    logits = rng.standard_normal((L, P, E))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    selected = np.argsort(-probs, axis=-1)[..., :k]
    weights = np.take_along_axis(probs, selected, -1)
    weights /= weights.sum(-1, keepdims=True)
    return std, probs, selected, weights


@pytest.mark.parametrize("L, P, E, k", [(2, 5, 8, 2), (48, 512, 128, 8)], ids=["small", "48x128x512"])
def test_every_builder_returns_a_figure_quickly(L, P, E, k):
    std, probs, selected, weights = synthetic(L, P, E, k)
    texts = [f"t{p}" for p in range(P)]
    start = time.perf_counter()
    figs = [
        charts.std_growth(std, nonfinite_by_slot={s: np.zeros(L, int) for s in SLOTS}),
        charts.layer_position_heatmap(np.abs(np.random.default_rng(1).standard_normal((L, P))), texts),
        charts.expert_heatmap(analysis.selection_counts(selected, E), title="counts"),
        charts.token_layer_experts(selected, weights, texts),
        charts.router_health(analysis.router_entropy(probs).mean(1), analysis.load_imbalance(
            analysis.selection_counts(selected, E)), analysis.topk_margin(probs, k).mean(1)),
        charts.topk_bars(["a", "b"], [0.6, 0.3]),
        charts.overlay_std_growth(std, {s: v * 2 for s, v in std.items()}, first_divergence=0),
        charts.flip_heatmap(analysis.flip_matrix(selected, np.roll(selected, 1, axis=-1))),
    ]
    assert all(isinstance(f, go.Figure) for f in figs)
    assert time.perf_counter() - start < 20
    # big inputs are reduced before they reach the browser, and the title says so
    heat = figs[1]
    assert np.asarray(heat.data[0].z).shape[1] <= 256
    if P > 256:
        assert "bucket" in heat.layout.title.text
        assert "position" in figs[3].layout.title.text and np.asarray(figs[3].data[0].z).shape[1] <= 128


def test_std_growth_marks_nonfinite_layers_and_thresholds():
    std = {"output": np.array([1.0, 20.0, np.nan])}
    fig = charts.std_growth(std, nonfinite_by_slot={"output": np.array([0, 0, 5])})
    marker = [t for t in fig.data if "NaN/Inf" in (t.name or "")]
    assert len(marker) == 1 and list(marker[0].x) == [2]
    assert any("std 10" in (a.text or "") for a in fig.layout.annotations)


def test_growth_factors_and_anomalies():
    std = {"output": np.array([1.0, 60.0]), "qkv": np.array([2.0, 1.0])}
    g = charts.growth_factors(std)
    assert g == {"output": 60.0, "qkv": 0.5}
    rows = charts.anomalies(std, {"output": np.array([0, 0]), "qkv": np.array([3, 0])})
    assert {"layer": 1, "slot": "output", "kind": "std > 50", "value": 60.0} in rows
    assert {"layer": 0, "slot": "qkv", "kind": "NaN/Inf", "value": 3} in rows


def test_router_analysis_numbers():
    selected = np.array([[[0, 1], [0, 1], [0, 2]]])  # 1 layer, 3 positions, k = 2
    weights = np.array([[[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]])
    counts = analysis.selection_counts(selected, 4)
    assert counts.tolist() == [[3, 2, 1, 0]]
    mw = analysis.mean_weights(selected, weights, 4)
    assert mw[0, 0] == pytest.approx(0.75) and np.isnan(mw[0, 3])
    assert analysis.load_imbalance(counts)[0] == pytest.approx(3 / 1.5)
    probs = np.array([[0.5, 0.3, 0.2, 0.0]])
    assert analysis.topk_margin(probs, 2)[0] == pytest.approx(0.1)
    assert analysis.router_entropy(np.array([[0.25] * 4]))[0] == pytest.approx(np.log(4))
    assert analysis.flip_matrix(selected, selected[:, :, ::-1]).max() == 0.0
    assert analysis.specialisation(np.array([[5, 0, 0, 0]]))[0] == pytest.approx(1.0)
