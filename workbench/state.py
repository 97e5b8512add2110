"""Cached loaders and shared controls for the pages. Engine and model: st.cache_resource; traces: st.cache_data."""

from __future__ import annotations

import streamlit as st

from engine.config import Knobs
from engine.model import Model, load_model

from .catalog import available_models, resolve_model
from .view import TraceView, from_recorder

DEFAULT_PROMPT = "def fizzbuzz(n):\n"


@st.cache_resource(show_spinner="Loading the model (memory-mapped; on a GPU, copied to it once)…", max_entries=4)
def get_model(path: str, backend: str = "cpu") -> Model:
    """The model at `path`, running on `backend` (one of engine.config.BACKENDS): one shared instance per pair."""
    return load_model(resolve_model(path), backend=backend)


@st.cache_resource(show_spinner=False)
def backend_problem(backend: str) -> str | None:
    """None when `backend` can run here, else the one-line reason (numba-cuda missing, no GPU, no AVX2)."""
    from engine.backend import unavailable_reason

    return unavailable_reason(backend)


def backend_picker(key: str = "backend") -> str:
    """The backend selectbox of the model controls: CPU, CPU with 8-bit activations, or CUDA (the same
    forward on a GPU). A backend
    that cannot run here stops the page with its one-line reason."""
    from engine.config import BACKEND_HELP, BACKENDS

    backend = st.selectbox("Backend", BACKENDS, key=key, help=BACKEND_HELP)
    problem = backend_problem(backend)
    if problem:
        st.error(problem)
        st.stop()
    return backend


@st.cache_data(show_spinner=False, max_entries=64)
def trace_view(path: str, prompt: str, chat: bool, knob_items: tuple, backend: str = "cpu") -> TraceView:
    """Trace `prompt` once with the knobs; cached by its arguments."""
    from engine.session import encode_prompt
    from traces.payload import build_payload
    from traces.tracing import trace_tokens

    model = get_model(path, backend)
    knobs = Knobs(**dict(knob_items))
    tokens = encode_prompt(model, prompt, chat=chat, template=knobs.template)
    rec = trace_tokens(model, tokens, knobs=knobs, capture_vectors={"output"}, top_k=20)
    view = from_recorder(rec, model, tokens, prompt=prompt, knobs=knobs)
    view.lens_outputs = {i: rec.vectors(i, "output")[-1] for i in range(model.config.n_layers)}
    view.payload = build_payload(model, rec, tokens, prompt=prompt, knobs=knobs, top_k=20)
    return view


def model_picker(key: str = "model") -> str:
    """The model selectbox (embedded models first); returns the chosen path."""
    choices = available_models()
    if not choices:
        st.error("No model found: the embedded models are missing and WORKBENCH_MODELS lists none.")
        st.stop()
    labels = [c.label for c in choices]
    label = st.selectbox("Model", labels, key=key)
    return str(choices[labels.index(label)].path)


def knob_controls(prefix: str = "") -> Knobs:
    """The knobs that reproduce the upstream bugs; defaults are the correct model."""
    with st.expander("Knobs (reproduce upstream bugs)"):
        qk = st.checkbox("Per-head Q/K RMSNorm", value=True, key=prefix + "qk_norm",
                         help="Off reproduces the upstream bug: layer std grew ~40x and the model printed %%%%.")
        override = st.checkbox("Override rope theta", value=False, key=prefix + "rope_override")
        theta = st.number_input("rope theta", min_value=1.0, value=10_000.0, step=1000.0, key=prefix + "rope_theta",
                                disabled=not override, help="Upstream defaulted to 10,000; qwen3moe uses 1,000,000.")
        norm = st.checkbox("norm_topk_prob (renormalise the k routing weights)", value=True, key=prefix + "norm_topk")
        template = st.selectbox("Chat template", ["auto", "chatml", "qwen3-nothink", "raw"], key=prefix + "template",
                                help="qwen3-nothink injects an empty <think> block (the upstream bug).")
    return Knobs(qk_norm=qk, rope_theta=float(theta) if override else None, norm_topk_prob=norm, template=template)


def knob_items(knobs: Knobs) -> tuple:
    return tuple(sorted(knobs.to_dict().items()))


def current_view() -> TraceView:
    """The last trace the Trace page ran, or the default trace of the default model."""
    view = st.session_state.get("view")
    if view is None:
        choices = available_models()
        if not choices:
            st.error("No model found.")
            st.stop()
        view = trace_view(str(choices[0].path), DEFAULT_PROMPT, False, knob_items(Knobs()))
        st.session_state["view"] = view
        st.session_state["view_model"] = str(choices[0].path)
    return view


def get_store():
    """The run store the CLI uses (TRACE_STORE, else the user's data folder)."""
    from traces.store import Store

    return Store(None)


def save_live_trace(path: str, prompt: str, chat: bool, knobs: Knobs, label: str | None, backend: str = "cpu") -> str:
    """Trace again with vectors and store it; returns the run id. (Cheap on the embedded model.)"""
    from engine.session import encode_prompt
    from traces.store import Run
    from traces.tracing import trace_tokens

    model = get_model(path, backend)
    tokens = encode_prompt(model, prompt, chat=chat, template=knobs.template)
    rec = trace_tokens(model, tokens, knobs=knobs, capture_vectors=True, top_k=20)
    return get_store().save(Run.from_trace(model, rec, tokens, prompt=prompt, knobs=knobs, label=label or None))
