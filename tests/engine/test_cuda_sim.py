"""The CUDA backend without a GPU: its kernels and forward under numba-cuda's simulator, and the
one-line errors when no GPU or no numba-cuda is there.

numba-cuda reads NUMBA_ENABLE_CUDASIM when numba.cuda is first imported, so the simulated tests
(tests/engine/sim_cuda_kernels.py, tests/engine/sim_cuda_forward.py: not collected by a plain `pytest`,
whose files are test_*.py) run in a pytest subprocess with the variable set. Their own test names are
the falsifiers in contracts/cuda_backend.yaml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIMULATED = ("tests/engine/sim_cuda_kernels.py", "tests/engine/sim_cuda_forward.py")


@pytest.mark.slow
@pytest.mark.parametrize("path", SIMULATED, ids=lambda p: Path(p).stem)
def test_cuda_backend_under_the_simulator(path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", path],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
    assert out.returncode == 0, f"simulated CUDA tests failed:\n{tail}"
    assert " passed" in out.stdout and "skipped" not in out.stdout, tail


def test_cuda_backend_without_a_gpu_is_a_one_line_error(cli, tiny_path):
    """Falsifier: `trace export --backend cuda` on a machine without a GPU (and no simulator) printing a
    traceback, or anything but one `error:` line naming the missing GPU, or exiting other than 1."""
    r = cli("export", tiny_path, "--tokens", "1,2", "--backend", "cuda", env={"NUMBA_ENABLE_CUDASIM": "0"})
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "GPU" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cuda_backend_without_numba_cuda_is_a_one_line_error(tiny_path):
    """Without numba-cuda importable the error names the package to install."""
    code = ("import sys; sys.modules['numba_cuda'] = None\n"
            "from traces.cli import main\n"
            f"main(['export', {str(tiny_path)!r}, '--tokens', '1', '--backend', 'cuda'])\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: the cuda backend needs numba-cuda"), r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_backend_is_refused(tiny_path):
    from engine.backend import BackendUnavailable
    from engine.model import load_model

    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_model(tiny_path, backend="tpu")
