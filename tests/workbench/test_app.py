"""The Streamlit app driven page by page with streamlit.testing.v1.AppTest, on a real model and engine."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(Path(__file__).resolve().parents[2] / "workbench" / "app.py")
TIMEOUT = 300


@pytest.fixture
def app():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def charts(at):
    return at.get("plotly_chart")


def test_landing_page_shows_std_growth_without_a_click(app):
    assert app.title[0].value == "Trace"
    assert len(charts(app)) >= 2  # std growth and the layer x position heatmap
    assert app.session_state["view"].n_layers >= 4
    labels = [s.label for s in app.selectbox]
    assert "Model" in labels
    assert app.selectbox(key="model").value


def test_turning_off_qk_norm_changes_the_trace(app):
    before = app.session_state["view"].std_last()["attn_out"].copy()
    app.checkbox(key="trace_qk_norm").uncheck().run()
    assert not app.exception, app.exception
    after = app.session_state["view"].std_last()["attn_out"]
    assert app.session_state["view"].knobs["qk_norm"] is False
    assert (abs(after - before) > 1e-6).any()


@pytest.mark.parametrize("page, title", [("app_pages/router.py", "Router"), ("app_pages/logits.py", "Logits")])
def test_router_and_logits_pages(app, page, title):
    app.switch_page(page).run()
    assert not app.exception, app.exception
    assert app.title[0].value == title
    assert len(charts(app)) >= 1
    assert len(app.dataframe) >= 1


def test_generate_with_a_seed_gives_the_same_text_twice(app):
    app.switch_page("app_pages/generate.py").run()
    app.number_input(key="gen_max_tokens").set_value(12)
    app.number_input(key="gen_seed").set_value(7)
    app.button(key="gen_run").click().run()
    assert not app.exception, app.exception
    first = app.session_state["gen_text"]
    app.button(key="gen_run").click().run()
    assert not app.exception, app.exception
    assert app.session_state["gen_text"] == first and len(first) > 0
    app.number_input(key="gen_seed").set_value(8)
    app.number_input(key="gen_temperature").set_value(1.5)
    app.button(key="gen_run").click().run()
    assert not app.exception, app.exception


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACE_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def test_diff_before_after_demo_names_layer_0(app, store):
    app.switch_page("app_pages/diff.py").run()
    assert not app.exception, app.exception
    app.button(key="diff_demo").click().run()
    assert not app.exception, app.exception
    fd = app.session_state["diff_result"]["first_divergence"]
    assert fd is not None and fd["layer"] == 0 and fd["slot"] == "attn_out"
    assert any("First divergence: layer 0" in e.value for e in app.error)
    assert len(charts(app)) >= 3
    # the same two runs, picked from the store
    app.radio(key="diff_mode").set_value("stored runs").run()
    assert not app.exception, app.exception
    assert app.session_state["diff_result"]["first_divergence"] is not None


def test_save_then_browse_rename_and_delete_runs(app, store):
    app.text_input(key="trace_label").set_value("first")
    next(b for b in app.button if b.label == "Save to the store").click().run()
    assert not app.exception, app.exception
    app.switch_page("app_pages/runs.py").run()
    assert not app.exception, app.exception
    assert list(app.dataframe[0].value["label"]) == ["first"]
    app.text_input(key="runs_label").set_value("renamed")
    app.button(key="runs_rename").click().run()
    assert list(app.dataframe[0].value["label"]) == ["renamed"]
    app.button(key="runs_delete").click().run()
    assert not app.exception, app.exception
    assert any("No runs yet" in i.value for i in app.info)


# --- uploads on the Diff page (robustness.md item 11): a clear st.error, never an exception ----------


@pytest.fixture(scope="module")
def payload_dict() -> dict:
    """A real payload of the embedded model whose token texts are HTML (tests/workbench/hostile.py)."""
    from engine.model import load_model
    from tests.workbench.hostile import hostile_payload
    from workbench.catalog import EMBEDDED_DIR

    return hostile_payload(load_model(EMBEDDED_DIR / "stdlib-coder-q8_0.gguf"))


@pytest.fixture(scope="module")
def good_payload(payload_dict) -> bytes:
    from traces.payload import dumps

    return dumps(payload_dict).encode()


def upload(a: tuple[str, bytes], b: tuple[str, bytes]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("app_pages/diff.py").run()
    at.radio(key="diff_mode").set_value("uploaded payloads").run()
    at.file_uploader(key="diff_upload_A").set_value((a[0], a[1], "application/json"))
    at.file_uploader(key="diff_upload_B").set_value((b[0], b[1], "application/json"))
    return at.run()


def test_two_valid_uploads_are_diffed(good_payload):
    at = upload(("a.json", good_payload), ("b.json", good_payload))
    assert not at.exception, at.exception
    assert at.session_state["diff_result"]["first_divergence"] is None
    assert any("No divergence" in s.value for s in at.success)


BAD_UPLOADS = {
    "not-json": (b"{nope", "a.json: not JSON"),
    "not-utf8": (b"\xff\xfe{}", "a.json: not JSON"),
    "empty": (b"", "a.json: not JSON"),
    "too-big": (b" " * (20 * 1024 * 1024 + 1), "a.json: 20971521 bytes is over the 20971520 byte limit"),
    "json-array": (b"[]", "a.json: does not match the trace payload schema"),
    "schema-mismatch": (b'{"format": "GGUF", "num_layers": "<script>window.__pwned=1</script>"}',
                        "a.json: does not match the trace payload schema"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "a.json: not JSON (maximum recursion depth"),
    "huge-schema-error": (b"[" + b"1," * 500_000 + b"1]", "a.json: does not match the trace payload schema at the top"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_a_bad_upload_is_a_clear_error(good_payload, case):
    content, message = BAD_UPLOADS[case]
    at = upload(("a.json", content), ("b.json", good_payload))
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(message) and "\n" not in errors[0], errors
    assert len(errors[0]) < 500  # a schema error quotes the offending value: cut short
    assert "diff_result" not in at.session_state


def _set(path, value):
    def change(p):
        *parents, last = path
        for key in parents:
            p = p[key]
        if value is _POP:
            p.pop(last)
        else:
            p[last] = value
    return change


_POP = object()
INCONSISTENT = {  # schema-valid payloads whose parts disagree: an error or a diff, never an exception
    "expert-id-overflows-int32": (_set(("router", 0, "positions", 0, "selected_experts"), [2**40, 1]), True),
    "ragged-router-positions": (_set(("router", 0, "positions", 1), _POP), True),
    "config-layers-disagree": (_set(("config", "n_layers"), 9), True),
    "fewer-tokens": (_set(("encoded_tokens", 0), _POP), True),
    "fewer-token-texts": (_set(("token_texts", 0), _POP), True),  # the Router page indexed past its end
    "router-position-out-of-range": (_set(("router", 0, "positions", 0, "position"), 99), True),
    "fewer-layers": (_set(("layers", 3), _POP), False),
    "layer-index-huge": (_set(("layers", 1, "layer_idx"), 10**9), False),
    "router-layer-missing": (_set(("router", 1), _POP), False),
    "n-experts-huge": (_set(("config", "n_experts"), 10**12), False),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_an_inconsistent_upload_never_raises(payload_dict, good_payload, case):
    import copy
    import json

    from contracts import validate_payload

    change, refused = INCONSISTENT[case]
    bad = copy.deepcopy(payload_dict)
    change(bad)
    validate_payload(bad)  # the schema alone does not catch these
    at = upload(("a.json", json.dumps(bad).encode()), ("b.json", good_payload))
    assert not at.exception, at.exception
    errors = [e.value for e in at.error if not e.value.startswith("First divergence")]
    if refused:
        assert len(errors) == 1 and "\n" not in errors[0], errors


def test_runs_page_opens_a_run_that_kept_fewer_than_20_logits(store, payload_dict):
    """A run stored from a payload (or `trace run --top-k 5`) keeps fewer top logits than the page's download
    asked for: the page used to raise StoreError."""
    from traces.store import Run, Store

    Store(store).save(Run.from_payload(payload_dict, label="seven logits"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["label"]) == ["seven logits"]
    at.button(key="runs_open").click().run()
    assert not at.exception, at.exception
    assert at.session_state["view"].token_texts[0] == payload_dict["token_texts"][0]
    assert len(at.get("download_button")) == 1
