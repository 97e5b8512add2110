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
