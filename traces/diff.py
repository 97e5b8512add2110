"""Diff of two traces over the same tokens, and the rule that names the first divergence.

Inputs are stored runs or exported payloads (traces.store.Run; a payload carries the last position only).
For every (layer, slot) in forward order — embedding, then per layer attn_norm, qkv, attn_out, ffn_norm,
ffn_out, output, then final_norm and logits — at every compared position:
    std ratio   sigma_B / sigma_A and |ln(sigma_B / sigma_A)|
    mean diff   mean_B - mean_A
    cosine      of the hidden-state vectors, when both runs captured them (`trace run --capture vectors`)
Per layer and position: the router's Jaccard index of the selected experts and the positions where the
selection flipped. Final logits per position: top-k overlap and KL(A || B).

THE FIRST DIVERGENCE is the earliest (layer, slot) in forward order that leaves the tolerance band:
    - its NaN/Inf counts differ, or
    - with vectors in both runs, the cosine drops below the band's floor, or
    - the std ratio leaves the band: |ln(sigma_B / sigma_A)| above the band's ceiling (checked with or
      without vectors: a cosine cannot see a change of scale).
Two bands; `auto` picks by whether both runs read the same model file (same content fingerprint, or for
payloads the same path and size):
    numerical     same weights: only float rounding is expected. At the worst position: cosine >= 0.9999
                  and |ln ratio| <= 1e-3. Engine vs the Hugging Face reference sits near 1 - 1e-6 and 1e-6;
                  turning off the Q/K norm or changing rope theta leaves the band at layer 0 attn_out
                  (everything before it is bit-identical).
    quantization  different files (e.g. Q8_0 vs Q4_K_M of the same weights): differences from the
                  embedding on are expected. Median over positions (a router flip changes one position's
                  expert output entirely; flips are reported under `router`): cosine >= 0.7 and
                  |ln ratio| <= 0.2. Measured on the test fixtures over five prompts: Q8_0 vs Q4_K_M and
                  F32 vs Q4_K stay at or below 0.063 and at or above 0.83; the Q/K norm turned off on top of
                  the change of quantization leaves the band at layer 0 attn_out (|ln ratio| 0.24 to 0.98).
                  This band finds gross breakage only; bisect a subtle bug with both runs on one file.
Within the quantization band the verdict is 'quantization-level' and first_divergence is null.

KL from stored top-k: the full logits are not stored, so KL(A || B) is computed over the shared top-k
tokens plus one bucket holding every other token's mass (1 - the listed probabilities). Merging tokens
can only lower KL (the data-processing inequality), so the figure is a lower bound, exact when the
shared top-k carry all the mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.errors import WorkbenchError
from engine.recorder import STAT_FIELDS

from .store import Run, changed_knobs, forward_order

STD = STAT_FIELDS.index("std_dev")
MEAN = STAT_FIELDS.index("mean")
NAN = STAT_FIELDS.index("nan_count")
INF = STAT_FIELDS.index("inf_count")
ALIGNS = ("prefix", "last")


@dataclass(frozen=True)
class Band:
    name: str
    cosine_min: float
    abs_log_std_ratio_max: float
    statistic: str  # 'worst' position, or 'median' over positions

    def reduce(self, values: np.ndarray, worst: str) -> float:
        if self.statistic == "median":
            return float(np.median(values))
        return float(values.min() if worst == "min" else values.max())

    def to_json(self) -> dict:
        return {"name": self.name, "cosine_min": self.cosine_min,
                "abs_log_std_ratio_max": self.abs_log_std_ratio_max, "statistic": self.statistic}


NUMERICAL = Band("numerical", cosine_min=0.9999, abs_log_std_ratio_max=1e-3, statistic="worst")
QUANTIZATION = Band("quantization", cosine_min=0.7, abs_log_std_ratio_max=0.2, statistic="median")
BANDS = {"numerical": NUMERICAL, "quantization": QUANTIZATION}


class DiffError(WorkbenchError):
    """Two traces that cannot be compared as asked (different tokens, layers, no common positions)."""


# ---------------------------------------------------------------------------------------------------
# alignment


def align_positions(a: Run, b: Run, align: str | None) -> list[tuple[int, int]]:
    """(position in A, position in B) pairs to compare."""
    ta, tb = a.tokens, b.tokens
    if align is None:
        if ta != tb:
            first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            raise DiffError(f"the traces ran different tokens (A {len(ta)}, B {len(tb)}, first difference at "
                            f"position {first}); pass --align prefix or --align last to compare anyway")
        return [(i, i) for i in range(len(ta))]
    if align == "prefix":
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        if n == 0:
            raise DiffError("the traces have no common prefix: their first tokens differ")
        return [(i, i) for i in range(n)]
    if align == "last":
        return [(len(ta) - 1, len(tb) - 1)]
    raise DiffError(f"align must be one of {', '.join(ALIGNS)}, got {align!r}")


def same_weights(a: Run, b: Run) -> tuple[bool, str]:
    ma, mb = a.meta.get("model") or {}, b.meta.get("model") or {}
    fa, fb = ma.get("fingerprint"), mb.get("fingerprint")
    if fa and fb:
        if fa.get("sha256") == fb.get("sha256"):
            return True, "both runs read the same model file (same fingerprint): only float rounding is expected"
        return False, "the runs read different model files: differences of quantization size are expected"
    if ma.get("path") and ma.get("path") == mb.get("path") and ma.get("file_size") == mb.get("file_size"):
        return True, "both traces name the same model file and size: only float rounding is expected"
    return False, "the traces come from different model files: differences of quantization size are expected"


# ---------------------------------------------------------------------------------------------------
# per (layer, slot)


def _abs_log_ratio(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """|ln(sb / sa)|: 0 where both are 0 or both NaN, inf where only one is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(np.log(sb / sa))
    both_zero = (sa == 0) & (sb == 0)
    both_nan = np.isnan(sa) & np.isnan(sb)
    r = np.where(both_zero | both_nan, 0.0, r)
    return np.where(np.isnan(r), np.inf, r)


def _cosines(va: np.ndarray, vb: np.ndarray) -> np.ndarray:
    a = va.astype(np.float64)
    b = vb.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (a * b).sum(-1) / (na * nb)
    c = np.where((na == 0) & (nb == 0), 1.0, c)
    return np.where(np.isfinite(c), c, -1.0)


def _rows(index: np.ndarray, wanted: list[int]) -> list[int | None]:
    where = {int(p): i for i, p in enumerate(index)}
    return [where.get(int(p)) for p in wanted]


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class SlotDiff:
    layer: int | None
    slot: str
    positions: int = 0  # compared positions carrying statistics in both
    std_a: float | None = None  # at the last compared position
    std_b: float | None = None
    std_ratio: float | None = None  # std_b / std_a there
    max_abs_log_std_ratio: float | None = None
    median_abs_log_std_ratio: float | None = None
    mean_a: float | None = None
    mean_b: float | None = None
    mean_diff: float | None = None  # mean_b - mean_a at the last compared position
    max_abs_mean_diff: float | None = None
    cosine_min: float | None = None  # None when either run has no vectors here
    cosine_median: float | None = None
    cosine_last: float | None = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    status: str = "absent"  # identical | numerical | quantization-level | diverged | absent
    metric: str | None = None  # what decided a 'diverged' status
    value: float | None = None
    tolerance: float | None = None

    def to_json(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = _num(v) if isinstance(v, float) else v
        return out


def _slot_diff(a: Run, b: Run, key, pairs, band: Band) -> SlotDiff:
    d = SlotDiff(layer=key[0], slot=key[1])
    sa, sb = a.stats(*key), b.stats(*key)
    if sa is None or sb is None:
        return d
    ia = _rows(sa.positions, [p for p, _ in pairs])
    ib = _rows(sb.positions, [q for _, q in pairs])
    keep = [(i, j) for i, j in zip(ia, ib) if i is not None and j is not None]
    if not keep:
        return d
    xa = sa.stats[[i for i, _ in keep]]
    xb = sb.stats[[j for _, j in keep]]
    d.positions = len(keep)
    lr = _abs_log_ratio(xa[:, STD], xb[:, STD])
    d.std_a, d.std_b = float(xa[-1, STD]), float(xb[-1, STD])
    d.std_ratio = d.std_b / d.std_a if d.std_a else (1.0 if d.std_b == 0 else math.inf)
    d.max_abs_log_std_ratio, d.median_abs_log_std_ratio = float(lr.max()), float(np.median(lr))
    d.mean_a, d.mean_b = float(xa[-1, MEAN]), float(xb[-1, MEAN])
    d.mean_diff = d.mean_b - d.mean_a
    dmean = np.abs(xb[:, MEAN] - xa[:, MEAN])
    d.max_abs_mean_diff = float(np.nanmax(dmean)) if np.isfinite(dmean).any() else None
    nfa, nfb = xa[:, NAN] + xa[:, INF], xb[:, NAN] + xb[:, INF]
    d.nonfinite_a, d.nonfinite_b = int(nfa.sum()), int(nfb.sum())
    identical = np.array_equal(xa, xb, equal_nan=True)

    cos = None
    va, vb = a.vector(*key), b.vector(*key)
    if va is not None and vb is not None and va[1].shape[1] == vb[1].shape[1]:
        ja = _rows(va[0], [p for p, _ in pairs])
        jb = _rows(vb[0], [q for _, q in pairs])
        vk = [(i, j) for i, j in zip(ja, jb) if i is not None and j is not None]
        if vk:
            xa_v, xb_v = va[1][[i for i, _ in vk]], vb[1][[j for _, j in vk]]
            cos = _cosines(xa_v, xb_v)
            d.cosine_min, d.cosine_median, d.cosine_last = float(cos.min()), float(np.median(cos)), float(cos[-1])
            identical = identical and np.array_equal(xa_v, xb_v, equal_nan=True)

    if identical:
        d.status = "identical"
        return d
    if not np.array_equal(nfa, nfb):
        d.status, d.metric, d.value, d.tolerance = "diverged", "nonfinite_count", float(abs(nfb - nfa).max()), 0.0
        return d

    def within(b_: Band) -> tuple[bool, str, float, float]:
        if cos is not None:  # the cosine is blind to scale: the std ratio is checked as well
            v = b_.reduce(cos, "min")
            if v < b_.cosine_min:
                return False, "cosine", v, b_.cosine_min
        v = b_.reduce(lr, "max")
        return v <= b_.abs_log_std_ratio_max, "abs_log_std_ratio", v, b_.abs_log_std_ratio_max

    ok, metric, value, tol = within(NUMERICAL)
    if ok:
        d.status = "numerical"
        return d
    if band is QUANTIZATION:
        ok, metric, value, tol = within(QUANTIZATION)
        if ok:
            d.status = "quantization-level"
            return d
    d.status, d.metric, d.value, d.tolerance = "diverged", metric, value, tol
    return d


# ---------------------------------------------------------------------------------------------------
# router and logits


def _router_diff(a: Run, b: Run, pairs) -> dict:
    ra, rb = a.router, b.router
    if ra is None or rb is None:
        return {"compared": False, "layers": [], "first_flip": None, "flips": 0}
    ia = _rows(ra.positions, [p for p, _ in pairs])
    ib = _rows(rb.positions, [q for _, q in pairs])
    keep = [(p, i, j) for (p, _), i, j in zip(pairs, ia, ib) if i is not None and j is not None]
    layers = []
    first = None
    flips = 0
    for layer in range(min(ra.selected.shape[0], rb.selected.shape[0])):
        jac = []
        flipped = []
        for p, i, j in keep:
            sa, sb = set(ra.selected[layer, i].tolist()), set(rb.selected[layer, j].tolist())
            jac.append(len(sa & sb) / len(sa | sb))
            if sa != sb:
                flipped.append(int(p))
        flips += len(flipped)
        if flipped and (first is None or layer < first["layer"]):
            first = {"layer": layer, "position": flipped[0]}
        layers.append({"layer": layer, "mean_jaccard": _num(np.mean(jac)) if jac else None,
                       "min_jaccard": _num(min(jac)) if jac else None, "flipped_positions": flipped})
    return {"compared": bool(keep), "positions": len(keep), "layers": layers, "first_flip": first, "flips": flips}


def kl_top_k(ids_a: np.ndarray, probs_a: np.ndarray, ids_b: np.ndarray, probs_b: np.ndarray) -> float:
    """KL(A || B) in nats over the shared top-k tokens plus one bucket for the rest (a lower bound)."""
    pb_of = {int(t): float(p) for t, p in zip(ids_b, probs_b)}
    shared = [(float(p), pb_of[int(t)]) for t, p in zip(ids_a, probs_a) if int(t) in pb_of]
    pa = np.array([x for x, _ in shared] + [0.0])
    pb = np.array([y for _, y in shared] + [0.0])
    pa[-1] = max(0.0, 1.0 - pa[:-1].sum())
    pb[-1] = max(0.0, 1.0 - pb[:-1].sum())
    eps = 1e-12
    mask = pa > 0
    return float(np.sum(pa[mask] * (np.log(pa[mask]) - np.log(np.maximum(pb[mask], eps)))))


def _logits_diff(a: Run, b: Run, pairs) -> dict:
    la, lb = a.logits, b.logits
    ia = _rows(la.positions, [p for p, _ in pairs])
    ib = _rows(lb.positions, [q for _, q in pairs])
    rows = []
    for (p, q), i, j in zip(pairs, ia, ib):
        if i is None or j is None:
            continue
        K = min(la.ids.shape[1], lb.ids.shape[1])
        top_a, top_b = la.ids[i, :K], lb.ids[j, :K]
        rows.append({
            "position_a": int(p), "position_b": int(q), "k": int(K),
            "top_k_overlap": len(set(top_a.tolist()) & set(top_b.tolist())) / K,
            "top1_a": int(top_a[0]), "top1_b": int(top_b[0]), "top1_same": bool(top_a[0] == top_b[0]),
            "kl": _num(kl_top_k(la.ids[i], la.probs[i], lb.ids[j], lb.probs[j])),
        })
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    return {"compared": bool(rows), "kl_is_lower_bound": True, "last": rows[-1] if rows else None,
            "max_kl": max(kls) if kls else None,
            "min_top_k_overlap": min(r["top_k_overlap"] for r in rows) if rows else None, "positions": rows}


# ---------------------------------------------------------------------------------------------------
# the diff


@dataclass
class Diff:
    a: Run
    b: Run
    align: str | None
    pairs: list[tuple[int, int]]
    band: Band
    band_reason: str
    rows: list[SlotDiff]
    router: dict
    logits: dict
    first_divergence: SlotDiff | None = None
    first_difference: SlotDiff | None = None
    verdict: str = "identical"
    message: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        fd = self.first_divergence
        return {
            "first_divergence": None if fd is None else {"layer": fd.layer, "slot": fd.slot, "metric": fd.metric,
                                                         "value": _num(fd.value), "tolerance": fd.tolerance},
            "verdict": self.verdict,
            "message": self.message,
            "first_difference": None if self.first_difference is None else {
                "layer": self.first_difference.layer, "slot": self.first_difference.slot},
            "band": dict(self.band.to_json(), reason=self.band_reason),
            "a": _describe(self.a),
            "b": _describe(self.b),
            "align": self.align,
            "compared_positions": [list(p) for p in self.pairs],
            "layers": [r.to_json() for r in self.rows],
            "router": self.router,
            "logits": self.logits,
        }

    def to_text(self) -> str:
        return render_text(self)


def _describe(r: Run) -> dict:
    m = r.meta.get("model") or {}
    return {"id": r.id, "label": r.label, "source": r.source, "model": m.get("name"), "model_path": m.get("path"),
            "tokens": len(r.tokens), "knobs_changed": changed_knobs(r.meta.get("knobs") or {})}


def diff_runs(a: Run, b: Run, *, align: str | None = None, band: str = "auto") -> Diff:
    """Compare B against A (A is the baseline: ratios are B / A, KL is KL(A || B))."""
    if a.n_layers != b.n_layers:
        raise DiffError(f"A has {a.n_layers} layers and B {b.n_layers}: not the same architecture")
    pairs = align_positions(a, b, align)
    same, why = same_weights(a, b)
    if band == "auto":
        chosen = NUMERICAL if same else QUANTIZATION
    elif band in BANDS:
        chosen = BANDS[band]
        why = f"chosen by the user ({why.split(':')[0]})"
    else:
        raise DiffError(f"band must be auto, numerical or quantization, got {band!r}")
    rows = [_slot_diff(a, b, key, pairs, chosen) for key in forward_order(a.n_layers)]
    if not any(r.positions for r in rows):
        raise DiffError("the traces share no position that both carry statistics for "
                        "(a payload keeps the last position only; try --align last)")
    d = Diff(a=a, b=b, align=align, pairs=pairs, band=chosen, band_reason=why, rows=rows,
             router=_router_diff(a, b, pairs), logits=_logits_diff(a, b, pairs))
    d.first_divergence = next((r for r in rows if r.status == "diverged"), None)
    d.first_difference = next((r for r in rows if r.status not in ("identical", "absent")), None)
    statuses = {r.status for r in rows}
    if d.first_divergence is not None:
        fd = d.first_divergence
        d.verdict = "diverged"
        d.message = (f"first divergence at {_where(fd)}: {fd.metric} {_fmt(fd.value)} "
                     f"{'<' if fd.metric == 'cosine' else '>'} {fd.tolerance:g} ({chosen.name} band)")
    elif "quantization-level" in statuses:
        worst = max((r for r in rows if r.status == "quantization-level"),
                    key=lambda r: (1 - r.cosine_median) if r.cosine_median is not None else r.median_abs_log_std_ratio)
        d.verdict = "quantization-level"
        what = (f"median cosine {worst.cosine_median:.4f} (floor {QUANTIZATION.cosine_min})"
                if worst.cosine_median is not None else
                f"median |ln std ratio| {worst.median_abs_log_std_ratio:.4f} (ceiling "
                f"{QUANTIZATION.abs_log_std_ratio_max})")
        d.message = (f"no divergence: differences are quantization-level, from {_where(d.first_difference)} on; "
                     f"the largest is {what} at {_where(worst)}")
    elif "numerical" in statuses:
        d.verdict = "numerical"
        d.message = "no divergence: the traces differ by float rounding only"
    else:
        d.verdict = "identical"
        d.message = "no divergence: the traces are identical"
    return d


def _where(r: SlotDiff) -> str:
    return f"{r.slot}" if r.layer is None else f"layer {r.layer} {r.slot}"


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"


def render_text(d: Diff) -> str:
    """A readable table; the first divergence row is marked."""
    lines = []
    for name, r in (("A", d.a), ("B", d.b)):
        info = _describe(r)
        knobs = ", ".join(f"{k}={v}" for k, v in info["knobs_changed"].items()) or "default"
        lines.append(f"{name}: {info['id'] or '(payload)'}{' [' + info['label'] + ']' if info['label'] else ''}  "
                     f"{info['source']}  {info['model']}  {info['tokens']} tokens  knobs: {knobs}")
    b = d.band
    stat = "at the worst position" if b.statistic == "worst" else "median over positions"
    lines.append(f"band: {b.name} ({d.band_reason}); cosine >= {b.cosine_min}, |ln std B/A| <= "
                 f"{b.abs_log_std_ratio_max:g}, {stat}")
    if d.align:
        lines.append(f"aligned by {d.align}: {len(d.pairs)} position(s)")
    header = f"{'layer':>5}  {'slot':<10} {'std A':>10} {'std B':>10} {'B/A':>8} {'max|ln|':>8} " \
             f"{'mean B-A':>10} {'cos min':>9}  status"
    lines.append(header)
    lines.append("-" * len(header))
    for r in d.rows:
        layer = "-" if r.layer is None else str(r.layer)
        mark = "  <<< first divergence" if r is d.first_divergence else ""
        cos = f"{r.cosine_min:.6f}" if r.cosine_min is not None else "-"
        lines.append(f"{layer:>5}  {r.slot:<10} {_fmt(r.std_a):>10} {_fmt(r.std_b):>10} {_fmt(r.std_ratio):>8} "
                     f"{_fmt(r.max_abs_log_std_ratio, 2):>8} {_fmt(r.mean_diff, 3):>10} {cos:>9}  {r.status}{mark}")
    rt = d.router
    if rt.get("compared"):
        ff = rt["first_flip"]
        means = [x["mean_jaccard"] for x in rt["layers"] if x["mean_jaccard"] is not None]
        lines.append(f"router: {rt['flips']} flipped selection(s) over {len(rt['layers'])} layers x "
                     f"{rt['positions']} positions; mean Jaccard {np.mean(means):.3f}"
                     + (f"; first flip at layer {ff['layer']} position {ff['position']}" if ff else ""))
    lg = d.logits
    if lg.get("last"):
        last = lg["last"]
        lines.append(f"logits (last compared position): top-{last['k']} overlap {last['top_k_overlap']:.2f}, top-1 "
                     f"{'same' if last['top1_same'] else 'differs'} ({last['top1_a']} vs {last['top1_b']}), "
                     f"KL(A||B) >= {_fmt(last['kl'])} nats (top-k approximation)")
    lines.append(f"verdict: {d.verdict}: {d.message}")
    return "\n".join(lines)
