"""Scale: the real Qwen3-30B-A3B shapes (2048 wide, 32/4 heads of 128, 128 experts of 768, vocab 151936)
through the real `trace` command, with the weights left in the page cache (anonymous memory bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_watching_memory(args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run the trace CLI, sampling the child's RssAnon every 20 ms; returns (result, peak kB)."""
    proc = subprocess.Popen([sys.executable, "-m", "traces", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon_kb(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=watch)
    t.start()
    out, err = proc.communicate(timeout=900)
    t.join()
    return subprocess.CompletedProcess(args, proc.returncode, out, err), peak[0]


def test_qwen3_30b_shapes_four_layers_export_in_bounded_memory(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "bench.gguf"
    synth = subprocess.run([sys.executable, "-m", "traces", "synth", "--shape", "qwen3-30b-a3b", "--layers", "4",
                            "-o", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert synth.returncode == 0, synth.stderr
    size = path.stat().st_size
    assert 1.7e9 < size < 2.4e9, size
    tokens = ",".join(str(7 + 13 * i) for i in range(32))
    proc, peak_kb = run_watching_memory(["export", str(path), "--tokens", tokens, "--top-k", "10", "-o", "-"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)
    assert payload["num_layers"] == 4 and payload["hidden_dim"] == 2048 and payload["vocab_size"] == 151936
    assert len(payload["encoded_tokens"]) == 32 and len(payload["logits"]["top_k"]) == 10
    print(f"file {size / 1e9:.2f} GB, peak RssAnon {peak_kb / 1024:.0f} MB")
    assert 0 < peak_kb < 1.5 * 1024 * 1024, f"peak anonymous memory {peak_kb / 1024:.0f} MB"
