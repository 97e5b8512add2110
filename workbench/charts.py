"""Chart builders: pure functions from arrays to Plotly figures, tested without Streamlit.

Inputs are plain numpy arrays and lists, so the same builders serve live traces, stored runs and
uploaded payloads. Large inputs are aggregated or downsampled here, and the figure says so in its
title (48 layers x 128 experts x 512 positions must stay responsive in a browser).

Legend: L = layers, P = positions, E = experts, k = experts used per token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

SLOTS = ("attn_norm", "qkv", "attn_out", "ffn_norm", "ffn_out", "output")
UPSTREAM_STD_THRESHOLDS = (10.0, 50.0, 100.0)  # `apr trace` flags layer std above these
MAX_HEATMAP_CELLS = 48 * 256  # beyond this, positions are bucketed


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=50, r=20, t=50, b=40), template="plotly_white", **kw)
    return fig


def std_growth(std_by_slot: Mapping[str, Sequence[float]], *, log_y: bool = True,
               nonfinite_by_slot: Mapping[str, Sequence[int]] | None = None, title: str | None = None) -> go.Figure:
    """Std of each slot across layers (one line per slot), with upstream thresholds and NaN/Inf markers.

    std_by_slot: slot -> (L,) std per layer; nonfinite_by_slot: slot -> (L,) NaN+Inf counts.
    """
    fig = go.Figure()
    n_layers = 0
    for slot, values in std_by_slot.items():
        y = np.asarray(values, dtype=np.float64)
        n_layers = max(n_layers, len(y))
        fig.add_trace(go.Scatter(x=np.arange(len(y)), y=y, mode="lines+markers", name=slot,
                                 hovertemplate=f"{slot}<br>layer %{{x}}<br>std %{{y:.4g}}<extra></extra>"))
        if nonfinite_by_slot and slot in nonfinite_by_slot:
            bad = np.flatnonzero(np.asarray(nonfinite_by_slot[slot]) > 0)
            if bad.size:
                fig.add_trace(go.Scatter(
                    x=bad, y=np.where(np.isfinite(y[bad]), y[bad], 1.0), mode="markers", name=f"{slot} NaN/Inf",
                    marker=dict(symbol="x", size=12, color="red"),
                    hovertemplate=f"{slot}: NaN/Inf at layer %{{x}}<extra></extra>"))
    finite_max = max((np.nanmax(np.where(np.isfinite(v), v, np.nan)) for v in
                      (np.asarray(x, dtype=np.float64) for x in std_by_slot.values()) if np.isfinite(v).any()),
                     default=1.0)
    for thr in UPSTREAM_STD_THRESHOLDS:
        if thr <= finite_max * 2:
            fig.add_hline(y=thr, line_dash="dot", line_color="grey", annotation_text=f"std {thr:g}",
                          annotation_position="top left")
    fig.update_xaxes(title="layer", dtick=max(1, n_layers // 12))
    fig.update_yaxes(title="std_dev", type="log" if log_y else "linear")
    return _layout(fig, title or "Std growth across layers")


def growth_factors(std_by_slot: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """slot -> std at the last layer / std at the first layer."""
    out = {}
    for slot, values in std_by_slot.items():
        v = np.asarray(values, dtype=np.float64)
        out[slot] = float(v[-1] / v[0]) if len(v) and v[0] else float("nan")
    return out


def anomalies(std_by_slot: Mapping[str, Sequence[float]], nonfinite_by_slot: Mapping[str, Sequence[int]]) -> list[dict]:
    """Rows {layer, slot, kind, value}: NaN/Inf counts and std above the upstream thresholds."""
    rows = []
    for slot, values in std_by_slot.items():
        for layer, s in enumerate(np.asarray(values, dtype=np.float64)):
            bad = int(np.asarray(nonfinite_by_slot.get(slot, [0] * len(values)))[layer])
            if bad:
                rows.append({"layer": layer, "slot": slot, "kind": "NaN/Inf", "value": bad})
            elif np.isfinite(s):
                over = [t for t in UPSTREAM_STD_THRESHOLDS if s > t]
                if over:
                    rows.append({"layer": layer, "slot": slot, "kind": f"std > {max(over):g}", "value": float(s)})
    return rows


def _bucket_columns(values: np.ndarray, labels: Sequence[str], max_cols: int, reduce=np.nanmean):
    """(rows, cols) -> at most max_cols columns by averaging contiguous buckets; returns values, labels, note."""
    cols = values.shape[1]
    if cols <= max_cols:
        return values, list(labels), ""
    edges = np.linspace(0, cols, max_cols + 1).astype(int)
    out = np.stack([reduce(values[:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    lab = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    return out, lab, f" (positions averaged in {max_cols} buckets of ~{cols // max_cols})"


def layer_position_heatmap(values: np.ndarray, token_texts: Sequence[str] | None = None, *, title: str = "std_dev",
                           log_color: bool = True, max_positions: int = 256) -> go.Figure:
    """values: (L, P) a statistic per layer and position. Positions are bucketed past max_positions."""
    values = np.asarray(values, dtype=np.float64)
    labels = [f"{p}: {t}" for p, t in enumerate(token_texts)] if token_texts else [str(p) for p in range(values.shape[1])]
    shown, labels, note = _bucket_columns(values, labels, max_positions)
    z = np.log10(np.clip(np.abs(shown), 1e-12, None)) if log_color else shown
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(shown.shape[1])), y=list(range(shown.shape[0])), customdata=np.array([labels] * shown.shape[0]),
        colorscale="Viridis", colorbar=dict(title="log10" if log_color else ""),
        hovertemplate="layer %{y}<br>position %{customdata}<br>value %{z:.3g}<extra></extra>"))
    fig.update_xaxes(title="position")
    fig.update_yaxes(title="layer")
    return _layout(fig, f"{title} per layer and position{note}")


def expert_heatmap(values: np.ndarray, *, title: str, colorbar: str = "") -> go.Figure:
    """values: (L, E), e.g. selection counts or mean routing weights per layer and expert."""
    values = np.asarray(values, dtype=np.float64)
    fig = go.Figure(go.Heatmap(z=values, colorscale="Blues", colorbar=dict(title=colorbar),
                               hovertemplate="layer %{y}<br>expert %{x}<br>%{z:.3g}<extra></extra>"))
    fig.update_xaxes(title="expert")
    fig.update_yaxes(title="layer")
    return _layout(fig, title)


def token_layer_experts(selected: np.ndarray, weights: np.ndarray, token_texts: Sequence[str], *,
                        max_positions: int = 128) -> go.Figure:
    """selected, weights: (L, P, k). Cell = the top-1 expert at (position, layer); hover lists all k with weights."""
    selected = np.asarray(selected)
    weights = np.asarray(weights, dtype=np.float64)
    L, P, k = selected.shape
    note = ""
    if P > max_positions:
        keep = np.linspace(0, P - 1, max_positions).astype(int)
        selected, weights, token_texts = selected[:, keep], weights[:, keep], [token_texts[i] for i in keep]
        note = f" (every {P // max_positions}th position of {P})"
        P = len(keep)
    hover = np.empty((L, P), dtype=object)
    for layer in range(L):
        for p in range(P):
            pairs = ", ".join(f"{int(e)}:{w:.2f}" for e, w in zip(selected[layer, p], weights[layer, p]))
            hover[layer, p] = f"{token_texts[p]!r} → {pairs}"
    fig = go.Figure(go.Heatmap(z=selected[:, :, 0], customdata=hover, colorscale="Turbo",
                               colorbar=dict(title="top-1 expert"),
                               hovertemplate="layer %{y}, position %{x}<br>%{customdata}<extra></extra>"))
    fig.update_xaxes(title="position")
    fig.update_yaxes(title="layer")
    return _layout(fig, f"Selected experts per token and layer{note}")


def router_health(entropy: Sequence[float], imbalance: Sequence[float], margin: Sequence[float]) -> go.Figure:
    """Per layer: mean router entropy (nats), load imbalance (max/mean expert load), mean top-k margin."""
    x = np.arange(len(entropy))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=entropy, name="entropy (nats)", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=x, y=imbalance, name="load imbalance (max/mean)", mode="lines+markers", yaxis="y2"))
    fig.add_trace(go.Scatter(x=x, y=margin, name="top-k margin p_k - p_(k+1)", mode="lines+markers"))
    fig.update_layout(yaxis2=dict(overlaying="y", side="right", title="imbalance"))
    fig.update_xaxes(title="layer")
    return _layout(fig, "Router health per layer")


def topk_bars(texts: Sequence[str], probs: Sequence[float], *, title: str = "Top-k next tokens") -> go.Figure:
    labels = [f"{i + 1}. {t!r}" for i, t in enumerate(texts)]
    fig = go.Figure(go.Bar(x=list(probs)[::-1], y=labels[::-1], orientation="h",
                           hovertemplate="%{y}<br>p = %{x:.4f}<extra></extra>"))
    fig.update_xaxes(title="probability")
    return _layout(fig, title, height=max(300, 24 * len(labels) + 100))


def overlay_std_growth(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], *, names=("A", "B"),
                       slots: Sequence[str] = ("output",), first_divergence: int | None = None,
                       log_y: bool = True) -> go.Figure:
    """Two runs' std growth on one chart, solid A and dashed B, with the first divergent layer marked."""
    fig = go.Figure()
    for slot in slots:
        for run, dash, name in ((a, "solid", names[0]), (b, "dash", names[1])):
            if slot in run:
                y = np.asarray(run[slot], dtype=np.float64)
                fig.add_trace(go.Scatter(x=np.arange(len(y)), y=y, name=f"{name} {slot}", line=dict(dash=dash)))
    if first_divergence is not None:
        fig.add_vline(x=first_divergence, line_color="red", annotation_text="first divergence")
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="std_dev", type="log" if log_y else "linear")
    return _layout(fig, "Std growth: " + " vs ".join(names))


def flip_heatmap(flips: np.ndarray, *, max_positions: int = 256) -> go.Figure:
    """flips: (L, P) 1 - Jaccard of the selected experts of two runs per layer and position."""
    flips = np.asarray(flips, dtype=np.float64)
    shown, labels, note = _bucket_columns(flips, [str(p) for p in range(flips.shape[1])], max_positions)
    fig = go.Figure(go.Heatmap(z=shown, zmin=0, zmax=1, colorscale="Reds", colorbar=dict(title="1 - Jaccard"),
                               customdata=np.array([labels] * shown.shape[0]),
                               hovertemplate="layer %{y}<br>position %{customdata}<br>%{z:.2f}<extra></extra>"))
    fig.update_xaxes(title="position")
    fig.update_yaxes(title="layer")
    return _layout(fig, f"Routing flips between the two runs{note}")


def series_over_steps(values: Mapping[str, Sequence[float]], *, title: str, y_title: str,
                      x_title: str = "generated token") -> go.Figure:
    """Lines over steps (e.g. last-layer output std per generated token, the answer's rank per layer)."""
    fig = go.Figure()
    for name, y in values.items():
        fig.add_trace(go.Scatter(x=np.arange(len(y)), y=y, name=name, mode="lines+markers"))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title)
    return _layout(fig, title)
