"""The store commands: `trace run`, `ls`, `show`, `diff`, `label`, `rm` and `export RUN_ID`.

The acceptance cases go through the real `trace` command in a subprocess; the cheap checks (help,
errors, summaries) use click's in-process runner on the same group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from traces.cli import main
from traces.cli_runs import export_run
from traces.store import Run, Store

TOKENS = "3,14,15,92,65,35,89"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli():
    """The real `trace` command in a subprocess (conftest's `cli`, at module scope)."""

    def run(*args, env=None):
        e = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, "-m", "traces", *map(str, args)], capture_output=True, text=True,
                              env=e, timeout=300, cwd=ROOT)

    return run


@pytest.fixture(scope="module")
def stored(cli, tiny_path, tmp_path_factory):
    """A store holding two runs made by the real CLI: 'before' (with vectors) and 'after' (Q/K norm off)."""
    root = tmp_path_factory.mktemp("store")
    env = {"TRACE_STORE": str(root)}
    before = cli("run", tiny_path, "--tokens", TOKENS, "--label", "before", "--capture", "vectors", env=env)
    assert before.returncode == 0, before.stderr
    after = cli("run", tiny_path, "--tokens", TOKENS, "--label", "after", "--no-qk-norm", "--store", root)
    assert after.returncode == 0, after.stderr
    return {"root": root, "env": env, "before": before, "after": after}


def run_id(proc) -> str:
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run ")
    return last.split()[1]


def invoke(*args, store=None):
    argv = [str(a) for a in args] + (["--store", str(store)] if store is not None else [])
    return CliRunner().invoke(main, argv)


def test_run_prints_its_id_last_and_ls_lists_newest_first(cli, stored):
    ids = [run_id(stored["before"]), run_id(stored["after"])]
    assert stored["before"].stdout.strip() == f"run {ids[0]}"  # stdout holds nothing else
    proc = cli("ls", "--json", env=stored["env"])
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["id"] for r in listed] == ids[::-1]
    by_label = {r["label"]: r for r in listed}
    assert by_label["after"]["knobs"] == {"qk_norm": False} and by_label["before"]["knobs"] == {}
    assert by_label["before"]["vectors"] and not by_label["after"]["vectors"]
    assert all(r["status"] == "ok" and r["n_tokens"] == 7 and r["source"] == "engine" for r in listed)
    text = invoke("ls", store=stored["root"]).stdout
    assert "before" in text and "qk_norm=False" in text


def test_diff_through_the_cli_names_layer_0_when_qk_norm_is_off(cli, stored):
    proc = cli("diff", "before", "after", "--json", env=stored["env"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["first_divergence"]["layer"], out["first_divergence"]["slot"]) == (0, "attn_out")
    same = json.loads(invoke("diff", "before", "before", "--json", store=stored["root"]).stdout)
    assert same["first_divergence"] is None
    text = invoke("diff", "before", "after", store=stored["root"]).stdout
    assert [line.split()[:2] for line in text.splitlines() if "<<< first divergence" in line] == [["0", "attn_out"]]


@pytest.fixture(scope="module")
def exported(tiny_path):
    """`trace export MODEL` over the same tokens (in process: the command's code, without a second start-up)."""
    res = CliRunner().invoke(main, ["export", str(tiny_path), "--tokens", TOKENS, "--top-k", "7", "-o", "-"])
    assert res.exit_code == 0, res.stderr
    return res.stdout


def test_export_run_equals_export_model(stored, exported, tmp_path):
    out = tmp_path / "run.json"
    export_run(run_id(stored["before"]), Store(stored["root"]), 7, str(out))
    assert out.read_text() == exported


def test_trace_export_run_id_equals_trace_export_model(cli, stored, exported):
    via_cli = cli("export", run_id(stored["before"]), "--top-k", "7", "-o", "-", env=stored["env"])
    assert via_cli.returncode == 0, via_cli.stderr
    assert via_cli.stdout == exported


def test_show_summarises_a_healthy_run(stored):
    res = invoke("show", "before", store=stored["root"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "std_dev at the last position" in lines
    assert any(line.split()[0] == "growth" for line in lines)
    assert "anomalies: none (no NaN/Inf, no std above 10)" in lines
    summary = json.loads(invoke("show", "before", "--json", store=stored["root"]).stdout)
    assert summary["anomalies"] == [] and len(summary["std_last_position"]["output"]) == 2
    assert len(summary["top_k_last_position"]) == 10


def test_show_flags_nonfinite_values_and_std_above_10_50_100(stored, tmp_path):
    store = Store(tmp_path / "copy")
    run = Store(stored["root"]).load("before")
    run.activations[(0, "ffn_out")].stats[3, 7] = 2  # 2 NaN at position 3
    run.activations[(1, "output")].stats[-1, 2] = 150.0
    run.activations[(1, "attn_out")].stats[1, 2] = 60.0
    run.activations[(0, "output")].stats[0, 2] = 11.0
    store.save(run)
    s = json.loads(invoke("show", run.id, "--json", store=store.root).stdout)
    got = {(a["layer"], a["slot"], a["kind"]) for a in s["anomalies"]}
    assert got == {(0, "ffn_out", "nonfinite"), (1, "output", "std > 100"), (1, "attn_out", "std > 50"),
                   (0, "output", "std > 10")}
    text = invoke("show", run.id, store=store.root).stdout
    assert "layer 0 ffn_out: 2 NaN, 0 Inf (first at position 3)" in text


def test_label_and_rm(stored, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(stored["root"], root)
    rid = run_id(stored["after"])
    assert invoke("label", "after", "qk off", store=root).exit_code == 0
    assert Store(root).load(rid).label == "qk off"
    res = invoke("rm", "qk off", store=root)
    assert res.exit_code == 0 and res.stdout.strip() == f"removed {rid}"
    assert [r["label"] for r in json.loads(invoke("ls", "--json", store=root).stdout)] == ["before"]
    empty = invoke("ls", store=tmp_path / "nothing-here")
    assert empty.exit_code == 0 and empty.stdout == "" and "no runs" in empty.stderr


def test_diff_takes_payload_files(stored, tmp_path):
    payload = tmp_path / "after.json"
    export_run("after", Store(stored["root"]), 5, str(payload))
    res = invoke("diff", "before", payload, "--json", store=stored["root"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["first_divergence"]["slot"] == "attn_out"


@pytest.mark.parametrize("args, message", [
    (["show", "nope"], "no run 'nope'"),
    (["rm", "../../etc/passwd"], "no run"),
    (["diff", "before", "{notjson}"], "not a JSON trace payload"),
    (["diff", "before", "{shorter}"], "--align"),
    (["run", "{model}", "--tokens", "1,2", "--label", "two\nlines"], "label"),
])
def test_bad_input_is_one_line_and_exit_1(stored, tiny_path, tmp_path, args, message):
    notjson = tmp_path / "x.json"
    notjson.write_text("{nope")
    run = Store(stored["root"]).load("before")
    payload = run.to_payload(5)
    payload["encoded_tokens"] = payload["encoded_tokens"][:-1]  # a self-consistent shorter trace
    payload["token_texts"] = payload["token_texts"][:-1]
    for layer in payload["router"]:
        layer["positions"] = layer["positions"][:-1]
    shorter = tmp_path / "shorter.json"
    shorter.write_text(json.dumps(Run.from_payload(payload).to_payload(5)))
    args = [a.format(notjson=notjson, shorter=shorter, model=tiny_path) for a in args]
    args += ["--store", str(stored["root"])]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and len(lines) == 1
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["run", "ls", "show", "diff", "rm", "label"])
def test_every_command_has_help_and_a_store_option(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "--store" in res.stdout and "TRACE_STORE" in res.stdout


def test_unknown_alignment_is_a_usage_error(stored):
    assert invoke("diff", "before", "after", "--align", "middle", store=stored["root"]).exit_code == 2
