"""`trace bench` reports its fields (a shape test, not a timed test: speed is a command, not an assertion)."""

from __future__ import annotations

import json

import pytest

KEYS = ("prefill_tok_s", "decode_tok_s", "decode_traced_tok_s", "load_s", "peak_rss_anon_mb", "compile_cold_s",
        "compile_warm_s", "start_to_first_token_warm_s", "traced_over_untraced", "threads", "machine", "peer",
        "decode_q8_tok_s")


@pytest.mark.slow
def test_bench_json_has_its_fields(cli, tiny_path):
    proc = cli("bench", tiny_path, "--prompt-tokens", "8", "--gen-tokens", "4", "--threads", "1", "--json",
               "--peer", "none", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in KEYS:
        assert key in out, key
    for key in ("prefill_tok_s", "decode_tok_s", "decode_traced_tok_s", "load_s", "peak_rss_anon_mb",
                "compile_cold_s", "compile_warm_s", "start_to_first_token_warm_s"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["threads"] == 1 and out["peer"] is None and out["repeats"] == 2
    assert out["decode_q8_tok_s"] is None  # an F32 file: 8-bit activations would change nothing


def test_bench_markdown_table(cli, tiny_path):
    proc = cli("bench", tiny_path, "--prompt-tokens", "4", "--gen-tokens", "2", "--threads", "1", "--markdown",
               "--peer", "none", "--no-compile-times", "--profile")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("`trace bench ")
    assert any(line.startswith("| decode tok/s |") for line in lines)
    assert not any(line.startswith("| decode tok/s, 8-bit activations") for line in lines)  # F32: not measured
    # the profile: the lm_head, the experts and the rest, with shares that add up to the whole step
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[lines.index("| operation | ms per token | share |"):]
            if line.startswith("| ") and not line.startswith("| operation")}
    assert {"lm_head", "experts", "attend", "(outside the operations)"} <= set(rows)
    shares = [float(cells[2].rstrip("% |")) for cells in rows.values()]
    assert abs(sum(shares) - 100) < 1.0


def test_bench_refuses_a_bad_file(cli, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    proc = cli("bench", bad, "--peer", "none")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ")


def test_bench_updates_the_marked_section_of_a_doc_and_nothing_else(cli, tiny_path, tmp_path):
    doc = tmp_path / "PERF.md"
    doc.write_text("# Perf\nbefore\n<!-- trace bench cpu: begin -->\nold table\n<!-- trace bench cpu: end -->\nafter\n")
    proc = cli("bench", tiny_path, "--prompt-tokens", "4", "--gen-tokens", "2", "--threads", "1", "--peer", "none",
               "--no-compile-times", "--update", doc)
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Perf\nbefore\n<!-- trace bench cpu: begin -->\n`trace bench")
    assert text.endswith("|\n<!-- trace bench cpu: end -->\nafter\n")
    table = text.split("begin -->\n")[1].split("\n<!--")[0]
    assert table == proc.stdout.strip()


def test_bench_refuses_a_doc_without_markers_before_measuring(cli, tiny_path, tmp_path):
    doc = tmp_path / "PERF.md"
    doc.write_text("no markers here\n")
    proc = cli("bench", tiny_path, "--peer", "none", "--update", doc)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ") and "trace bench cpu: begin" in proc.stderr
    assert doc.read_text() == "no markers here\n" and "Traceback" not in proc.stderr


def test_bench_measures_cpu_q8_beside_cpu_on_a_k_quant_file(cli, model_factory):
    from engine.kernels.cpu_q8 import unavailable

    proc = cli("bench", model_factory(qtype="Q4_K_M"), "--prompt-tokens", "4", "--gen-tokens", "2", "--threads", "1",
               "--json", "--peer", "none", "--no-compile-times")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if unavailable() is None:
        assert isinstance(out["decode_q8_tok_s"], float) and out["decode_q8_tok_s"] > 0
    else:
        assert out["decode_q8_tok_s"] is None
