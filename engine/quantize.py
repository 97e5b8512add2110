"""Our GGUF block writer: float32 weights -> raw GGML blocks, vectorised with numpy over all blocks.

gguf-py writes Q8_0 and BF16 but not the K-quants, so the fixture factory needs its own writer.
The byte layouts follow engine/quants.py; they are proven by gguf-py's `dequantize`
(tests/engine/test_quantize.py), never by a decoder of ours.

The scale search is the simple one, not llama.cpp's iterative make_qkx2_quants / make_qx_quants:
  - Q4_K, Q5_K: affine per sub-block of 32, range [min(x, 0), max(x)] (the min is stored negated);
  - Q6_K: symmetric per sub-block of 16, the signed extreme lands on q = -32 (the full 6-bit range);
  - Q8_0: symmetric per block of 32, absmax -> 127 (as ggml's reference does).
Block scales are rounded *up* to f16, so no sub-block scale overflows its 6 or 8 bits and a tiny but
nonzero block never collapses to a zero scale. Gaussian weights come back with a relative RMS error
of about Q8_0 0.5 %, Q6_K 1.9 %, Q5_K 3.8 %, Q4_K 7.8 % (about what those bit widths allow per sub-block;
llama.cpp's search gains roughly a tenth).

Legend: B = blocks, S = sub-blocks per block, n = elements per sub-block.
"""

from __future__ import annotations

import numpy as np

from .quants import QT, block_layout, row_bytes, type_name

F16_MAX = 65504.0
CHUNK_BLOCKS = 4096  # blocks quantized per numpy pass: bounded temporaries, cache-friendly


def _f16_up(v: np.ndarray, qt: QT) -> np.ndarray:
    """(B,) non-negative float -> (B,) float16, the smallest f16 >= v (0 stays 0)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.all(np.isfinite(h)):
        raise ValueError(f"values too large for {qt.name}: a block scale overflows float16")
    return h


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    """(B,) float -> (B, 2) uint8, little-endian float16."""
    return np.ascontiguousarray(h, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _safe(v: np.ndarray) -> np.ndarray:
    """Divisor with zeros replaced by one (callers zero those lanes themselves)."""
    return np.where(v != 0, v, 1)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(B, 8) six-bit scales and mins -> (B, 12) bytes, the inverse of ggml's get_scale_min_k4.

    bytes 0..3:  sc[0..3] low 6 bits | sc[4..7] bits 4-5 in bits 6-7
    bytes 4..7:  mn[0..3] low 6 bits | mn[4..7] bits 4-5 in bits 6-7
    bytes 8..11: sc[4..7] bits 0-3   | mn[4..7] bits 0-3 in bits 4-7
    """
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(B, 8, 32) values < 16 -> (B, 128): byte l of group g holds sub-block 2g (low) and 2g+1 (high)."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q8_0(x: np.ndarray) -> np.ndarray:
    """(B, 32) float32 -> (B, 34): d:f16, qs:int8[32]; y = d * q."""
    d = _f16_up(np.abs(x).max(axis=1) / 127.0, QT.Q8_0)  # (B,)
    q = np.clip(np.rint(x / _safe(d.astype(np.float32))[:, None]), -127, 127).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _k_affine(x: np.ndarray, levels: int, qt: QT):
    """Affine sub-block quantization shared by Q4_K (levels 15) and Q5_K (levels 31).

    x: (B, 256) -> d (B,) f16, dmin (B,) f16, sc (B, 8), mn (B, 8), q (B, 8, 32) uint8,
    with y = d * sc * q - dmin * mn.
    """
    b = x.reshape(-1, 8, 32)  # (B, S, n)
    lo = np.minimum(b.min(axis=2), 0.0)  # (B, S): the stored min is -lo >= 0
    hi = b.max(axis=2)
    scale = (hi - lo) / levels
    d = _f16_up(scale.max(axis=1) / 63.0, qt)
    dmin = _f16_up((-lo).max(axis=1) / 63.0, qt)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]  # (B, 1)
    sc = np.clip(np.rint(scale / _safe(d32)), 0, 63)
    mn = np.clip(np.rint(-lo / _safe(dmin32)), 0, 63)
    # a sub-block whose scale rounds to zero is the constant -dmin*mn: make that its mean, not its min
    flat = sc == 0
    mn = np.where(flat, np.clip(np.rint(np.maximum(-b.mean(axis=2), 0.0) / _safe(dmin32)), 0, 63), mn)
    step = d32 * sc  # (B, S)
    off = dmin32 * mn
    q = np.rint((b + off[:, :, None]) / _safe(step)[:, :, None])
    q = np.where(flat[:, :, None], 0, np.clip(q, 0, levels)).astype(np.uint8)
    return d, dmin, sc, mn, q


def _q4_k(x: np.ndarray) -> np.ndarray:
    """(B, 256) -> (B, 144): d:f16, dmin:f16, scales:u8[12], qs:u8[128]."""
    d, dmin, sc, mn, q = _k_affine(x, 15, QT.Q4_K)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), _pack_nibbles(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    """(B, 256) -> (B, 176): d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]."""
    d, dmin, sc, mn, q = _k_affine(x, 31, QT.Q5_K)
    high = (q >> 4) & 1  # (B, S, n): bit j of qh[l] is the 5th bit of sub-block j, element l
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qh, _pack_nibbles(q & 0xF)],
                          axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """(B, 256) -> (B, 210): ql:u8[128], qh:u8[64], scales:i8[16], d:f16; y = d * sc * (q - 32)."""
    b = x.reshape(-1, 16, 16)  # (B, S, n)
    extreme = np.take_along_axis(b, np.abs(b).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]  # (B, S) signed
    scale = -extreme / 32.0  # the extreme lands on q = -32, so all 64 levels are in use
    d = _f16_up(np.abs(scale).max(axis=1) / 127.0, QT.Q6_K)
    sc = np.clip(np.rint(scale / _safe(d.astype(np.float32))[:, None]), -127, 127)
    step = d.astype(np.float32)[:, None] * sc  # (B, S)
    q = np.where(step[:, :, None] != 0, np.clip(np.rint(b / _safe(step)[:, :, None]), -32, 31), 0)
    q = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (B, half, quarter k, element l)
    # element (half h, quarter k, l): ql[64h + 32(k % 2) + l] nibble k // 2, qh[32h + l] bits 2k..2k+1
    ql = np.empty((q.shape[0], 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


_BLOCK_WRITERS = {QT.Q8_0: _q8_0, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}
WRITABLE: frozenset[QT] = frozenset({QT.F32, QT.F16, QT.BF16, *_BLOCK_WRITERS})


def quantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """float32 (..., cols) -> uint8 (..., row_bytes): raw GGML rows of `qtype`, ready for a GGUF file.

    Raises ValueError when cols is not a whole number of blocks, when the data holds NaN or infinity,
    when a value does not fit the type (F16 beyond 65504, a block scale beyond f16) or the type has no writer.
    """
    qt = QT(qtype)
    if qt not in WRITABLE:
        raise ValueError(f"no writer for {type_name(qt)}; writable: {', '.join(t.name for t in WRITABLE)}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 0:
        raise ValueError("quantize needs at least one dimension (..., cols)")
    cols = data.shape[-1]
    rb = row_bytes(qt, cols)  # ValueError for a partial block
    if not np.all(np.isfinite(data)):
        raise ValueError(f"cannot write NaN or infinite values as {qt.name}")
    out_shape = data.shape[:-1] + (rb,)
    if qt == QT.F32:
        return data.view(np.uint8).reshape(out_shape)
    if qt == QT.F16:
        if data.size and np.abs(data).max() > F16_MAX:
            raise ValueError(f"values beyond ±{F16_MAX:g} do not fit F16")
        return data.astype(np.float16).view(np.uint8).reshape(out_shape)
    if qt == QT.BF16:
        bits = data.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype(np.uint16).view(np.uint8).reshape(out_shape)
    qk, nbytes = block_layout(qt)
    blocks = data.reshape(-1, qk)  # (B, QK)
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    write = _BLOCK_WRITERS[qt]
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = write(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(out_shape)


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform random bytes, fast (64 bits per draw)."""
    return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _uniform_std(levels: int) -> float:
    """Standard deviation of an integer uniform on levels + 1 values."""
    return float(np.sqrt(((levels + 1) ** 2 - 1) / 12.0))


# six-bit sub-block scales drawn from [SC_LO, SC_HI): their root mean square
SC_LO, SC_HI = 24, 40
_SC_RMS = float(np.sqrt(np.mean(np.arange(SC_LO, SC_HI, dtype=np.float64) ** 2)))


def random_blocks(qtype: int, shape: tuple[int, ...], rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random but valid raw rows of `qtype` for a tensor of logical `shape` (..., cols) -> uint8 (..., row_bytes).

    No float32 copy of the weights is made: quant bytes are uniform random, the f16 scale fields are
    set so the dequantized weights have mean about 0 and standard deviation about `std`. For huge files.
    """
    qt = QT(qtype)
    cols = shape[-1]
    rb = row_bytes(qt, cols)
    lead = tuple(int(s) for s in shape[:-1])
    if qt in (QT.F32, QT.F16, QT.BF16):
        return quantize(rng.standard_normal(lead + (cols,), dtype=np.float32) * np.float32(std), qt)
    if qt not in _BLOCK_WRITERS:
        raise ValueError(f"no random block writer for {type_name(qt)}")
    qk, nbytes = block_layout(qt)
    nblk = int(np.prod(lead, dtype=np.int64)) * (cols // qk)
    raw = _random_bytes(rng, nblk * nbytes).reshape(nblk, nbytes)
    if qt == QT.Q8_0:  # y = d * q, q uniform int8 (mean -0.5: a bias of 0.7 % of std)
        raw[:, 0:2] = _f16_bytes(np.full(nblk, std / _uniform_std(255)))
    elif qt in (QT.Q4_K, QT.Q5_K):  # y = d*sc*q - dmin*mn with mn = sc, dmin = d*levels/2: y = d*sc*(q - levels/2)
        levels = 15 if qt == QT.Q4_K else 31
        d = std / (_uniform_std(levels) * _SC_RMS)
        raw[:, 0:2] = _f16_bytes(np.full(nblk, d))
        raw[:, 2:4] = _f16_bytes(np.full(nblk, d * levels / 2))
        sc = (SC_LO + _random_bytes(rng, nblk * 8) % (SC_HI - SC_LO)).reshape(nblk, 8)
        raw[:, 4:16] = _pack_scales_k4(sc, sc)
    else:  # Q6_K: y = d * sc * (q - 32), q uniform on 0..63; random signs on sc cancel the mean of q - 32
        sc = (SC_LO + _random_bytes(rng, nblk * 16) % (SC_HI - SC_LO)).astype(np.int8).reshape(nblk, 16)
        sc = np.where(_random_bytes(rng, nblk * 16).reshape(nblk, 16) & 1, -sc, sc).astype(np.int8)
        raw[:, 192:208] = sc.view(np.uint8)
        raw[:, 208:210] = _f16_bytes(np.full(nblk, std / (_uniform_std(63) * _SC_RMS)))
    return raw.reshape(lead + (rb,))

