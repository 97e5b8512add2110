"""Every CUDA kernel compiles for a real GPU (PTX for sm_90, the H100), in the GPU launch geometry.

The simulator runs the kernels as Python, which accepts code the CUDA target would reject (types that
do not unify, unsupported calls); this compiles them with NVVM as a GPU run would, no GPU needed.
Needs NVVM and NVRTC (`pip install '.[cuda-compile]'`); skipped without them.
"""

from __future__ import annotations

import os
import types

import pytest
from gguf import GGMLQuantizationType as QT

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator compiles nothing", allow_module_level=True)
pytest.importorskip("numba_cuda")


def _nvvm_missing() -> str | None:
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    except Exception as exc:  # the libraries are optional
        return f"NVVM/NVRTC not installed ({type(exc).__name__}): pip install '.[cuda-compile]'"
    return None


F2, F3, F4 = "float32[:, ::1]", "float32[:, :, ::1]", "float32[:, :, :, ::1]"
ROW_SIGNATURES = {
    "rmsnorm": f"void({F2}, float32[::1], float32, {F2})",
    "rope": f"void({F3}, {F2}, {F2}, {F3})",
    "kv_write": f"void({F3}, {F3}, {F4}, {F4}, int64, int64)",
    "attention": f"void({F3}, {F4}, {F4}, int64, int64, float32, {F3})",
    "route": f"void({F2}, int64, boolean, {F2}, int32[:, ::1], {F2}, int32[::1], int32[::1], int32[::1], int32[::1])",
    "swiglu": "void(float32[::1], float32[::1], float32[::1])",
    "weighted_sum": f"void({F2}, {F3}, {F2})",
    "add": "void(float32[::1], float32[::1], float32[::1])",
    "copy_cols": f"void({F2}, {F2}, int64)",
    "stats": f"void({F2}, float64[:, ::1])",
    "copy_positions": f"void({F4}, {F4}, int64)",
}
TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)


@pytest.fixture
def compile_ptx(monkeypatch):
    reason = _nvvm_missing()
    if reason:
        pytest.skip(reason)
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    # device functions are compiled for "the current device": there is none, so name the H100's
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: types.SimpleNamespace(compute_capability=(9, 0)))

    def compile_(kernel, signature):
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        assert ".entry" in ptx
        return ptx

    return compile_


def test_row_kernels_compile_for_sm90(compile_ptx):
    from engine.kernels import cuda as K

    rk = K.row_kernels(K.GPU)
    for name, signature in ROW_SIGNATURES.items():
        compile_ptx(getattr(rk, name), signature)


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_quant_kernels_compile_for_sm90(compile_ptx, qt):
    from engine.kernels import cuda as K

    tk = K.type_kernels(qt, K.GPU)
    w = {QT.F32: "float32", QT.F16: "uint16", QT.BF16: "uint16"}.get(qt, "uint8") + "[:, :, ::1]"
    compile_ptx(tk.matmul, f"void({w}, {F2}, {F2})")
    compile_ptx(tk.experts, f"void({w}, {F2}, int64, int64, int32[::1], int32[::1], int32[::1], int32[::1], {F2})")
    compile_ptx(tk.rows, f"void({w}, int64[::1], {F2})")
