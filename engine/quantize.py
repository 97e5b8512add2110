"""Our GGUF block writer: float32 weights -> raw GGML blocks, vectorised over all blocks with numpy.

gguf-py can write Q8_0 and BF16 but not the K-quants, so the fixture factory needs its own writer.
The byte layout is proven by gguf-py's `dequantize` (tests/engine/test_quantize.py), never by our
own decoder. The K-quant scale search is the simple one (per sub-block min/max or absmax, scales
quantized to 6 or 8 bits); llama.cpp's iterative search is more accurate, and these fixtures do not
need it.

Legend: B = blocks, QK = elements per block, S = sub-blocks per block.
"""

from __future__ import annotations

import numpy as np

from .quants import QK_K, QT, block_layout, row_bytes, type_name


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(B,) float -> (B, 2) uint8 little-endian f16."""
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32)  # (B, 32)
    d = np.abs(b).max(axis=1) / 127.0
    d16 = d.astype(np.float16).astype(np.float32)
    inv = np.where(d16 > 0, 1.0 / np.where(d16 > 0, d16, 1), 0.0)
    q = np.clip(np.rint(b * inv[:, None]), -127, 127).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(B, 8) six-bit scales and mins -> (B, 12) bytes, the inverse of ggml's get_scale_min_k4."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _k_scales(b: np.ndarray, levels: int):
    """Affine sub-block quantization shared by Q4_K (levels 15) and Q5_K (levels 31).

    b: (B, 8, 32) -> d (B,), dmin (B,), sc (B, 8), mn (B, 8), q (B, 8, 32) with y = d*sc*q - dmin*mn.
    """
    lo = np.minimum(b.min(axis=2), 0.0)  # (B, 8)
    hi = b.max(axis=2)
    scale = (hi - lo) / levels
    minv = -lo
    d = (scale.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (minv.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 63)
    mn = np.clip(np.rint(minv / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63)
    step = d[:, None] * sc  # (B, 8)
    off = dmin[:, None] * mn
    q = np.rint((b + off[:, :, None]) / np.where(step > 0, step, 1)[:, :, None])
    q = np.where(step[:, :, None] > 0, np.clip(q, 0, levels), 0).astype(np.uint8)
    return d, dmin, sc, mn, q


def _q4_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 8, 32)
    d, dmin, sc, mn, q = _k_scales(b, 15)
    q = q.reshape(-1, 4, 2, 32)  # group g: sub-blocks 2g (low nibble) and 2g+1 (high nibble)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 8, 32)
    d, dmin, sc, mn, q = _k_scales(b, 31)
    low = q & 0xF
    high = (q >> 4) & 1  # (B, 8, 32): bit j of qh[l] is the 5th bit of sub-block j, element l
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] << j).astype(np.uint8)
    low = low.reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 16, 16)  # 16 sub-blocks of 16; sub-block i // 16 has scale index i // 16
    amax = np.abs(b).max(axis=2)
    scale = amax / 31.0
    d = (scale.max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = d[:, None] * sc
    q = np.rint(b / np.where(step > 0, step, 1)[:, :, None])
    q = (np.where(step[:, :, None] > 0, np.clip(q, -32, 31), 0) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # half n, quarter k, element l: ql[64n + l + 32(k%2)] nibble k//2, qh[32n + l] bits 2k..2k+1
    ql = np.zeros((q.shape[0], 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.astype(np.uint8).reshape(-1, 64), scales, _f16_bytes(d)], axis=1)


_WRITERS = {QT.Q8_0: _q8_0, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}


def quantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """float32 (..., cols) -> uint8 (..., row_bytes) raw GGML blocks of `qtype`."""
    qt = QT(qtype)
    data = np.ascontiguousarray(data, dtype=np.float32)
    cols = data.shape[-1]
    rb = row_bytes(qt, cols)  # raises ValueError for a partial block
    lead = data.shape[:-1]
    if qt == QT.F32:
        return data.view(np.uint8).reshape(lead + (rb,))
    if qt == QT.F16:
        return data.astype(np.float16).view(np.uint8).reshape(lead + (rb,))
    if qt == QT.BF16:
        bits = data.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return rounded.view(np.uint8).reshape(lead + (rb,))
    if qt not in _WRITERS:
        raise ValueError(f"no writer for {type_name(qt)}")
    qk = block_layout(qt)[0]
    blocks = _WRITERS[qt](data.reshape(-1, qk).astype(np.float64))
    return np.ascontiguousarray(blocks).reshape(lead + (rb,))


def random_blocks(qtype: int, shape: tuple[int, ...], rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random but valid raw blocks for a tensor of logical `shape` (..., cols), fast and without any float32
    copy of the weights: random quant bytes, f16 scales chosen so the dequantized std is about `std`."""
    qt = QT(qtype)
    cols = shape[-1]
    rb = row_bytes(qt, cols)
    lead = tuple(shape[:-1])
    if qt in (QT.F32, QT.F16, QT.BF16):
        return quantize((rng.standard_normal(lead + (cols,), dtype=np.float32) * std), qt)
    qk, nbytes = block_layout(qt)
    nblk = int(np.prod(lead, dtype=np.int64)) * (cols // qk)
    raw = rng.integers(0, 256, size=(nblk, nbytes), dtype=np.uint8)
    if qt == QT.Q8_0:  # q uniform in [-128, 127]: std ~ 74
        raw[:, 0:2] = _f16_bytes(np.full(nblk, std / 74.0))
    elif qt in (QT.Q4_K, QT.Q5_K):
        levels = 15 if qt == QT.Q4_K else 31
        # sc, mn uniform six-bit: keep the mins near half the range so values centre on zero
        d = std / (levels * 0.29 * 32)
        raw[:, 0:2] = _f16_bytes(np.full(nblk, d))
        raw[:, 2:4] = _f16_bytes(np.full(nblk, d * levels / 2))
        sc = rng.integers(24, 40, size=(nblk, 8))
        raw[:, 4:16] = _pack_scales_k4(sc, sc)
    elif qt == QT.Q6_K:
        raw[:, 192:208] = rng.integers(24, 40, size=(nblk, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = _f16_bytes(np.full(nblk, std / (18.5 * 32)))
    else:
        raise ValueError(f"no random block writer for {type_name(qt)}")
    return raw.reshape(lead + (rb,))
