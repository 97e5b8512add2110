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
