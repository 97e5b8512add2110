"""Numbers the pages show, computed from a trace's arrays (no Streamlit here).

Legend: L = layers, P = positions, E = experts, k = experts used per token.
"""

from __future__ import annotations

import numpy as np


def selection_counts(selected: np.ndarray, n_experts: int) -> np.ndarray:
    """selected: (L, P, k) -> (L, E) how many positions picked each expert, per layer."""
    L = selected.shape[0]
    out = np.zeros((L, n_experts), dtype=np.int64)
    for layer in range(L):
        out[layer] = np.bincount(selected[layer].ravel(), minlength=n_experts)[:n_experts]
    return out


def mean_weights(selected: np.ndarray, weights: np.ndarray, n_experts: int) -> np.ndarray:
    """(L, E) mean routing weight of each expert when selected (NaN where never selected)."""
    L = selected.shape[0]
    out = np.full((L, n_experts), np.nan)
    for layer in range(L):
        sums = np.bincount(selected[layer].ravel(), weights=weights[layer].ravel().astype(np.float64),
                           minlength=n_experts)[:n_experts]
        counts = np.bincount(selected[layer].ravel(), minlength=n_experts)[:n_experts]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[layer] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


def router_entropy(probs: np.ndarray) -> np.ndarray:
    """probs: (..., E) softmax -> (...) entropy in nats."""
    p = np.clip(probs.astype(np.float64), 1e-30, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def load_imbalance(counts: np.ndarray) -> np.ndarray:
    """counts: (L, E) -> (L,) max load / mean load (1.0 is perfectly balanced)."""
    mean = counts.mean(axis=1)
    return np.where(mean > 0, counts.max(axis=1) / np.maximum(mean, 1e-30), np.nan)


def topk_margin(probs: np.ndarray, k: int) -> np.ndarray:
    """probs: (..., E) -> (...) p_k - p_(k+1): how close the k-th pick was to losing its place (fragile routing)."""
    srt = -np.sort(-probs.astype(np.float64), axis=-1)
    if srt.shape[-1] <= k:
        return np.full(srt.shape[:-1], np.nan)
    return srt[..., k - 1] - srt[..., k]


def specialisation(counts: np.ndarray) -> np.ndarray:
    """(L,) 1 - normalised entropy of each layer's expert load: 0 = uniform use, 1 = one expert takes all."""
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1)
    return 1 - ent / np.log(counts.shape[1])


def flip_matrix(selected_a: np.ndarray, selected_b: np.ndarray) -> np.ndarray:
    """(L, P, k) x 2 -> (L, P) 1 - Jaccard of the two runs' selected experts (0: same choice)."""
    L, P = min(selected_a.shape[0], selected_b.shape[0]), min(selected_a.shape[1], selected_b.shape[1])
    out = np.zeros((L, P))
    for layer in range(L):
        for p in range(P):
            a, b = set(selected_a[layer, p].tolist()), set(selected_b[layer, p].tolist())
            out[layer, p] = 1 - len(a & b) / len(a | b) if a | b else 0.0
    return out
