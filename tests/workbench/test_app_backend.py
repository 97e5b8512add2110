"""The backend selector of the app's model controls, on this GPU-less machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[2] / "workbench" / "app.py")


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="the simulator stands in for a GPU")
@pytest.mark.parametrize("page, key", [(None, "trace_backend"), ("app_pages/generate.py", "gen_backend")])
def test_choosing_cuda_without_a_gpu_shows_a_one_line_error(page, key):
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    if page:
        at.switch_page(page).run()
    assert at.selectbox(key=key).value == "cpu"
    at.selectbox(key=key).select("cuda").run()
    assert not at.exception, at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert "GPU" in message and "\n" not in message


def test_choosing_cpu_q8_traces_the_default_model_without_error():
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.selectbox(key="trace_backend").select("cpu-q8").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="trace_backend").value == "cpu-q8"
