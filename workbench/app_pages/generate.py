"""Generate: stream tokens with every sampling control, see the speed, and why each token was picked."""

import time

import numpy as np
import pandas as pd
import streamlit as st

from engine.errors import WorkbenchError
from engine.generate import Generation, generate
from engine.sampler import SamplingParams
from engine.session import encode_prompt
from traces.recorder import TraceRecorder
from workbench import charts
from workbench.state import DEFAULT_PROMPT, backend_picker, get_model, knob_controls, model_picker

STD = 2

st.title("Generate")
with st.sidebar:
    path = model_picker("gen_model")
    backend = backend_picker("gen_backend")
    knobs = knob_controls("gen_")

prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="gen_prompt", height=120)
chat = st.toggle("Chat template", value=False, key="gen_chat")
c1, c2, c3, c4 = st.columns(4)
temperature = c1.number_input("temperature", 0.0, 5.0, 0.7, 0.05, key="gen_temperature")
top_k = c2.number_input("top_k", 0, 100000, 40, 1, key="gen_top_k")
top_p = c3.number_input("top_p", 0.01, 1.0, 0.95, 0.01, key="gen_top_p")
min_p = c4.number_input("min_p", 0.0, 1.0, 0.05, 0.01, key="gen_min_p")
c5, c6, c7, c8 = st.columns(4)
repeat_penalty = c5.number_input("repeat_penalty", 0.01, 5.0, 1.1, 0.05, key="gen_repeat_penalty")
repeat_last_n = c6.number_input("repeat_last_n", -1, 100000, 64, 1, key="gen_repeat_last_n")
seed = c7.number_input("seed", 0, 2**31 - 1, 42, 1, key="gen_seed")
max_tokens = c8.number_input("max tokens", 1, 4096, 64, 1, key="gen_max_tokens")
stop_text = st.text_input("Stop strings (comma-separated)", "", key="gen_stop")
per_step = st.toggle("Trace every step (charts over generated tokens)", value=False, key="gen_trace")

if st.button("Generate", type="primary", key="gen_run"):
    try:
        params = SamplingParams(temperature=temperature, top_k=int(top_k), top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=int(repeat_last_n), seed=int(seed),
                                max_tokens=int(max_tokens),
                                stop=tuple(s for s in (x.strip() for x in stop_text.split(",")) if s))
        with st.spinner("Loading the model…"):
            model = get_model(path, backend)
        ids = encode_prompt(model, prompt, chat=chat, template=knobs.template)
    except WorkbenchError as exc:
        st.error(str(exc))
        st.stop()
    tok = model.tokenizer
    res = Generation(prompt_ids=list(ids))
    rec = TraceRecorder(top_k=5) if per_step else None
    steps = []
    start = time.perf_counter()

    def pieces():
        printed = ""
        kwargs = {"recorder": rec} if rec is not None else {}
        for step in generate(model, ids, params, knobs=knobs, record_sampling=True, result=res, **kwargs):
            steps.append(step)
            text = tok.decode(res.token_ids)
            stable = text if step.finish else text.rstrip("\ufffd")
            if stable.startswith(printed) and len(stable) > len(printed):
                yield stable[len(printed):]
                printed = stable

    st.subheader("Output")
    with st.spinner("Generating (the first run compiles the kernels)…"):
        try:
            text = st.write_stream(pieces())
        except WorkbenchError as exc:
            st.error(str(exc))
            st.stop()
    elapsed = time.perf_counter() - start
    st.session_state["gen_result"] = {"text": tok.decode(res.token_ids), "steps": steps, "res": res,
                                      "elapsed": elapsed, "rec": rec, "n_prompt": len(ids),
                                      "n_layers": model.config.n_layers}

out = st.session_state.get("gen_result")
if out:
    res = out["res"]
    n = len(res.token_ids)
    rate = (n - 1) / res.decode_seconds if n > 1 and res.decode_seconds > 0 else float("nan")
    st.code(out["text"], language=None)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("tokens", n)
    m2.metric("decode tok/s", f"{rate:.1f}")
    m3.metric("prefill s", f"{res.prefill_seconds:.2f}")
    m4.metric("finish", res.finish or "closed")
    st.session_state["gen_text"] = out["text"]

    steps = out["steps"]
    if out["rec"] is not None and steps:
        rec = out["rec"]
        P0 = out["n_prompt"]
        last = out["n_layers"] - 1
        std = rec.stats(last, "output")[P0 - 1:, STD]
        probs = [s.record.chosen_prob for s in steps]
        st.plotly_chart(charts.series_over_steps({"last-layer output std": std[: len(steps)]},
                                                 title="Last-layer output std per generated token", y_title="std"),
                        width="stretch", key="gen_std_chart")
        st.plotly_chart(charts.series_over_steps({"probability of the chosen token": probs},
                                                 title="Chosen-token probability", y_title="p"),
                        width="stretch", key="gen_prob_chart")
    if steps:
        st.subheader("Why this token?")
        i = st.slider("step", 0, len(steps) - 1, 0, key="gen_step") if len(steps) > 1 else 0
        rec = steps[i].record
        tok = get_model(path, backend).tokenizer
        st.write(f"step {i}: chose {tok.token_text(rec.chosen)!r} (id {rec.chosen}) with p = {rec.chosen_prob:.4f}"
                 + (" — greedy" if rec.greedy else ""))
        rows = []
        for stage in rec.stages:
            for rank, (tid, val) in enumerate(stage.top):
                rows.append({"stage": stage.name, "candidates left": stage.candidates, "rank": rank + 1,
                             "token": tok.token_text(tid), "id": tid, "value": val})
        st.dataframe(pd.DataFrame(rows), hide_index=True)
        st.caption("value: logits for raw, repeat_penalty and temperature; probabilities after top_k, top_p, min_p.")
