"""The run store: Parquet layout and types, lossless payload round trip, atomic writes under SIGKILL,
corrupt files, concurrent writers, a full disk, stale temporary folders. Real traces of the tiny fixture."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import Knobs
from engine.forward import forward
from engine.kv_cache import KVCache
from engine.recorder import LAYER_SLOTS
from traces.payload import build_payload, dumps
from traces.reference import ReferenceOutput
from traces.store import Run, Store, StoreError, default_root, fingerprint
from traces.tracing import trace_tokens

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What is 2+2? Think step by step."
STAT_COLUMNS = ["count", "mean", "std_dev", "min", "max", "l2_norm", "abs_max", "nan_count", "inf_count", "zero_count"]


@pytest.fixture(scope="module")
def traced(tiny_model):
    tokens = tiny_model.tokenizer.encode(PROMPT)
    knobs = Knobs()
    rec = trace_tokens(tiny_model, tokens, knobs=knobs, capture_vectors=True, top_k=20)
    return tiny_model, rec, tokens, knobs


@pytest.fixture
def run(traced):
    model, rec, tokens, knobs = traced
    return Run.from_trace(model, rec, tokens, prompt=PROMPT, knobs=knobs, label="base")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "runs")


def types(path: Path) -> dict[str, str]:
    return {f.name: str(f.type) for f in pq.read_schema(path)}


def test_tables_open_with_pyarrow_and_pandas_with_documented_columns(store, run, traced):
    model, rec, tokens, _ = traced
    cfg = model.config
    P, L, k, E = len(tokens), cfg.n_layers, cfg.n_experts_used, cfg.n_experts
    rid = store.save(run)
    d = store.root / rid
    assert sorted(p.name for p in d.iterdir()) == ["activations.parquet", "logits.parquet", "meta.json",
                                                   "router.parquet", "router_probs.parquet", "vectors.parquet"]
    stat_types = {c: ("int64" if c.endswith("count") else "double") for c in STAT_COLUMNS}
    assert types(d / "activations.parquet") == {"layer": "int16", "slot": "string", "position": "int32", **stat_types}
    assert list(types(d / "activations.parquet")) == ["layer", "slot", "position", *STAT_COLUMNS]
    assert types(d / "router.parquet") == {"layer": "int16", "position": "int32", "rank": "int16", "expert": "int32",
                                           "weight": "float", "entropy": "double"}
    assert types(d / "router_probs.parquet") == {"layer": "int16", "position": "int32", "probs": "list<element: float>"}
    assert types(d / "logits.parquet") == {"position": "int32", "rank": "int16", "token_id": "int32", "logit": "float",
                                           "prob": "float", "text": "string"}
    assert types(d / "vectors.parquet") == {"layer": "int16", "slot": "string", "position": "int32",
                                            "values": "list<element: float>"}

    act = pd.read_parquet(d / "activations.parquet")
    # every slot at every position, and the logits' stats at every position
    assert len(act) == (6 * L + 2) * P + P
    assert set(act["slot"]) == {*LAYER_SLOTS, "embedding", "final_norm", "logits"}
    assert act.loc[act["slot"].isin(["embedding", "final_norm", "logits"]), "layer"].isna().all()
    assert act.loc[act["slot"].isin(LAYER_SLOTS), "layer"].notna().all()
    row = act[(act["layer"] == 1) & (act["slot"] == "ffn_out") & (act["position"] == P - 1)].iloc[0]
    assert row["std_dev"] == rec.stats(1, "ffn_out")[-1, 2]
    assert row["count"] == cfg.hidden

    router = pd.read_parquet(d / "router.parquet")
    assert len(router) == L * P * k
    probs = pq.read_table(d / "router_probs.parquet")
    assert probs.num_rows == L * P and len(probs.column("probs")[0]) == E
    assert np.allclose(np.array(probs.column("probs")[0].as_py()).sum(), 1.0, atol=1e-5)
    logits = pd.read_parquet(d / "logits.parquet")
    assert len(logits) == P * 20 and logits["text"].map(type).eq(str).all()
    vectors = pq.read_table(d / "vectors.parquet")
    assert vectors.num_rows == (6 * L + 2) * P

    meta = json.loads((d / "meta.json").read_text())
    for name in ("activations", "router", "router_probs", "logits", "vectors"):
        info = meta["files"][f"{name}.parquet"]
        assert info["bytes"] == (d / f"{name}.parquet").stat().st_size and len(info["sha256"]) == 64


def test_meta_records_what_was_run(store, run, traced):
    model, _, tokens, _ = traced
    rid = store.save(run)
    meta = json.loads((store.root / rid / "meta.json").read_text())
    assert meta["schema_version"] == 1 and meta["id"] == rid and meta["label"] == "base"
    assert meta["source"] == "engine"
    assert meta["model"]["path"] == str(model.path) and meta["model"]["file_size"] == model.path.stat().st_size
    assert meta["model"]["fingerprint"] == fingerprint(model.path)
    assert meta["config"]["sources"]["rope_theta"] == "file" and meta["config"]["n_layers"] == 2
    assert meta["knobs"] == Knobs().to_dict()
    assert meta["prompt"] == PROMPT and meta["tokens"] == list(tokens)
    assert meta["token_texts"] == [model.tokenizer.token_text(t) for t in tokens]
    assert datetime.fromisoformat(meta["created"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert meta["versions"]["numpy"] == np.__version__ and meta["versions"]["pyarrow"] == pa.__version__
    assert meta["captured"]["router_probs"] is True and len(meta["captured"]["vectors"]) == 6 * 2 + 2


def test_fingerprint_reads_head_and_tail_only(tmp_path):
    a = tmp_path / "a.bin"
    data = bytearray(os.urandom(3 << 20))
    a.write_bytes(data)
    b = tmp_path / "b.bin"
    b.write_bytes(data)
    assert fingerprint(a) == fingerprint(b)
    data[-1] ^= 1  # the last MiB counts
    b.write_bytes(data)
    assert fingerprint(a) != fingerprint(b)
    data[-1] ^= 1
    data[(3 << 20) // 2] ^= 1  # the middle does not: documented, it is not a full-file hash
    b.write_bytes(data)
    assert fingerprint(a) == fingerprint(b)


def test_payload_round_trip_is_lossless(store, run, traced):
    model, rec, tokens, knobs = traced
    for top_k in (1, 5, 20):
        payload = build_payload(model, rec, tokens, prompt=PROMPT, knobs=knobs, top_k=top_k)
        assert run.to_payload(top_k) == payload
        assert dumps(store.load(store.save(run)).to_payload(top_k)) == dumps(payload)
        # payload -> store -> payload
        back = store.load(store.save(Run.from_payload(payload)))
        assert back.meta["captured"]["positions"] == "last"
        assert dumps(back.to_payload(top_k)) == dumps(payload)
    payload["lens"] = {"note": "a field a later version adds"}
    assert store.load(store.save(Run.from_payload(payload))).to_payload(top_k) == payload
    with pytest.raises(StoreError, match="top 20"):
        run.to_payload(21)
    with pytest.raises(StoreError, match="not a trace payload"):
        Run.from_payload({"layers": [], "encoded_tokens": [1], "num_layers": "two"})


def test_store_round_trip_keeps_every_array(store, run):
    back = store.load(store.save(run))
    assert back.meta == {k: v for k, v in run.meta.items()}
    assert set(back.activations) == set(run.activations)
    for key, s in run.activations.items():
        assert np.array_equal(back.activations[key].positions, s.positions)
        assert np.array_equal(back.activations[key].stats, s.stats, equal_nan=True)
    for name in ("positions", "selected", "weights", "entropy", "probs"):
        assert np.array_equal(getattr(back.router, name), getattr(run.router, name)), name
    for name in ("positions", "ids", "logits", "probs"):
        assert np.array_equal(getattr(back.logits, name), getattr(run.logits, name)), name
    assert back.logits.texts == run.logits.texts
    assert set(back.vectors) == set(run.vectors)
    for key, (pos, v) in run.vectors.items():
        assert np.array_equal(back.vectors[key][0], pos) and np.array_equal(back.vectors[key][1], v)


def test_router_probs_can_be_left_out(store, traced):
    model, rec, tokens, knobs = traced
    small = Run.from_trace(model, rec, tokens, prompt=None, knobs=knobs, router_probs=False)
    rid = store.save(small)
    assert not (store.root / rid / "router_probs.parquet").exists()
    back = store.load(rid)
    assert back.router.probs is None
    assert np.array_equal(back.router.entropy, small.router.entropy)  # entropy is kept regardless


def test_reference_run_marks_unobserved_slots_absent(store, traced):
    """A reference run stores what HF observed; a slot it could not observe is absent, never zero."""
    model, rec, tokens, knobs = traced
    logits = forward(model, np.array(tokens), KVCache(model.config, capacity=len(tokens)), all_logits=True)
    slots = {key: rec.vectors(*key) for key in rec.vector_keys}
    del slots[(1, "qkv")]
    L = model.config.n_layers
    ref = ReferenceOutput(logits=logits, slots=slots,
                          router_logits=[rec.router_array(i, "router_logits") for i in range(L)],
                          selected_experts=[rec.router_array(i, "selected_experts") for i in range(L)],
                          expert_weights=[rec.router_array(i, "expert_weights") for i in range(L)])
    r = Run.from_reference(model, tokens, ref, prompt=PROMPT, knobs=knobs)
    assert r.source == "reference" and r.meta["absent_slots"] == [[1, "qkv"]]
    back = store.load(store.save(r))
    assert back.stats(1, "qkv") is None and back.vector(1, "qkv") is None
    assert np.array_equal(back.stats(1, "output").stats, rec.stats(1, "output"))
    payload = back.to_payload(5)
    assert payload["layers"][1]["qkv"]["count"] == 0 and payload["layers"][1]["qkv"]["std_dev"] is None
    direct = build_payload(model, rec, tokens, prompt=PROMPT, knobs=knobs)
    assert payload["logits"]["top_k"] == direct["logits"]["top_k"]
    assert "torch" in back.meta["versions"]


def test_list_newest_first_rename_remove_and_resolve(store, run):
    older = copy.deepcopy(run)
    older.meta["created"] = "2025-01-01T00:00:00Z"
    second = store.save(run)
    first = store.save(older)
    assert [s.id for s in store.list()] == [second, first]
    s = store.list()[0]
    assert s.status == "ok" and s.label == "base" and s.n_tokens == len(run.tokens) and s.vectors
    assert store.resolve(second) == second
    with pytest.raises(StoreError, match="matches 2 runs"):
        store.resolve("base")  # both carry the label
    store.rename(first, "before fix")
    assert store.resolve("before fix") == first and store.resolve("base") == second
    assert store.load("before fix").label == "before fix"
    with pytest.raises(StoreError, match="matches 2 runs"):
        store.resolve(second[:4])  # the year
    with pytest.raises(StoreError, match="label"):
        store.rename(first, "bad\nlabel")
    for bad in ("../../etc/passwd", "", "nope"):
        with pytest.raises(StoreError):
            store.load(bad)
    assert store.remove(first) == first
    assert [s.id for s in store.list()] == [second]
    assert sorted(os.listdir(store.root)) == [second]


def test_default_store_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACE_STORE", str(tmp_path / "env"))
    assert default_root() == tmp_path / "env"
    monkeypatch.delenv("TRACE_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "moe-workbench" / "runs"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".local" / "share" / "moe-workbench" / "runs"
    assert Store().root == default_root()


# --- robustness: the store under attack (robustness.md item 10) ---------------------------------

WRITER = """
import sys
from traces.store import Store
run = Store(sys.argv[1]).load(sys.argv[2])
out = Store(sys.argv[3])
print("ready", flush=True)
for _ in range(int(sys.argv[4])):
    out.save(run)
"""


def writer(src: Store, rid: str, dest: Path, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(src.root), rid, str(dest), str(count)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_write_leaves_nothing_listed_and_no_stray_files(store, run, tmp_path):
    rid = store.save(run)
    dest = tmp_path / "killed"
    for attempt in range(5):
        proc = writer(store, rid, dest, 10**6)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline = time.time() + 20
        caught = False
        while time.time() < deadline and not caught:
            if dest.is_dir():
                caught = any(n.startswith(".tmp.") and len(os.listdir(dest / n)) > 0 for n in os.listdir(dest))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if any(n.startswith(".tmp.") for n in os.listdir(dest)):
            break  # killed while a run was half written
    else:
        pytest.fail("never managed to kill the writer mid-write")
    complete = [n for n in os.listdir(dest) if not n.startswith(".")]
    listed = Store(dest).list()
    assert sorted(s.id for s in listed) == sorted(complete)
    assert all(s.status == "ok" for s in listed)
    assert not [n for n in os.listdir(dest) if n.startswith(".")]  # the half-written run is gone
    for s in listed:
        assert Store(dest).load(s.id).to_payload(5) == run.to_payload(5)


def test_concurrent_writers_both_complete(store, run, tmp_path):
    rid = store.save(run)
    dest = tmp_path / "shared"
    procs = [writer(store, rid, dest, 4) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    listed = Store(dest).list()
    assert len(listed) == 8 and all(s.status == "ok" for s in listed)
    assert len({s.id for s in listed}) == 8
    assert sorted(os.listdir(dest)) == sorted(s.id for s in listed)


def test_corrupt_parquet_is_reported_and_other_runs_stay_readable(store, run):
    good = store.save(run)
    truncated = store.save(copy.deepcopy(run))
    flipped = store.save(copy.deepcopy(run))
    path = store.root / truncated / "activations.parquet"
    path.write_bytes(path.read_bytes()[:-100])  # the footer is gone: "magic bytes not found"
    path = store.root / flipped / "router.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, footer intact: only the checksum sees it
    path.write_bytes(bytes(data))

    status = {s.id: s for s in store.list()}
    assert status[good].status == "ok" and status[flipped].status == "ok"
    assert status[truncated].status == "corrupt" and "activations.parquet" in status[truncated].error
    status = {s.id: s for s in store.list(verify=True)}
    assert status[flipped].status == "corrupt" and "checksum" in status[flipped].error
    for bad in (truncated, flipped):
        with pytest.raises(StoreError, match="corrupt"):
            store.load(bad)
    assert store.load(good).to_payload(5) == run.to_payload(5)
    (store.root / good / "meta.json").write_text("{not json")
    assert {s.id: s.status for s in store.list()}[good] == "corrupt"
    store.remove(truncated)  # a corrupt run can be removed
    assert truncated not in {s.id for s in store.list()}


def test_disk_full_during_write_leaves_nothing(store, run, monkeypatch):
    import traces.store as store_mod

    earlier = store.save(run)
    real = store_mod._write_bytes
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_bytes", full)
    with pytest.raises(StoreError, match="No space left"):
        store.save(copy.deepcopy(run))
    assert os.listdir(store.root) == [earlier]
    assert [s.id for s in store.list()] == [earlier]


def test_stale_temporary_folders_are_cleaned_live_ones_kept(store, run):
    store.save(run)
    host = store._host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".tmp.{dead.pid}.20250101-000000-aaaaaa.{host}": True,  # our host, writer gone: clean
        f".tmp.{os.getpid()}.20250101-000000-bbbbbb.{host}": False,  # our host, writer alive: keep
        ".tmp.1.20250101-000000-cccccc.elsewhere.example": False,  # another host, recent: keep
        ".tmp.1.20250101-000000-dddddd.far.example": True,  # another host, untouched 20 min: clean
    }
    for name in names:
        (store.root / name).mkdir()
        (store.root / name / "activations.parquet").write_bytes(b"PAR1 half")
    old = time.time() - 1200
    for p in (store.root / ".tmp.1.20250101-000000-dddddd.far.example").rglob("*"):
        os.utime(p, (old, old))
    os.utime(store.root / ".tmp.1.20250101-000000-dddddd.far.example", (old, old))
    assert len(store.list()) == 1
    left = set(os.listdir(store.root))
    for name, cleaned in names.items():
        assert (name not in left) == cleaned, name
