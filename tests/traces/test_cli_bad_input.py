"""Every bad input of shared/docs/robustness.md items 1, 7 and 8 through the real `trace` command.

`trace export` and `trace generate` run in a subprocess (conftest's `cli`): token ids negative, past
the vocabulary, empty or not numbers; prompts longer than the context; every sampling parameter out
of its range; missing, non-GGUF, malformed and non-qwen3moe files. Each must exit 1 with a single
`error: ...` line on stderr after the progress lines (2 with click's usage message where click checks
the type), and never a Python traceback.
"""

from __future__ import annotations

import re
import struct

import pytest

from tests.gguf_bytes import GGUFSpec, KV, STRING

VOCAB = 300
CONTEXT = 16


@pytest.fixture(scope="module")
def files(model_factory, tmp_path_factory):
    """A small model (vocab 300, context 16) and bad files beside it."""
    root = tmp_path_factory.mktemp("bad-input")
    model = model_factory(n_layers=1, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4, n_experts_used=2,
                          moe_ff=32, vocab_size=VOCAB, tokenizer="synthetic", context_length=CONTEXT)
    not_gguf = root / "readme.gguf"
    not_gguf.write_text("hello, I am not a model at all\n")
    huge_kv = root / "huge-kv.gguf"
    huge_kv.write_bytes(GGUFSpec(n_kv=2**63).build())
    llama = GGUFSpec()
    llama.kvs[0] = KV("general.architecture", STRING, "llama")
    wrong_arch = root / "llama.gguf"
    wrong_arch.write_bytes(llama.build())
    return {"model": model, "not_gguf": not_gguf, "huge_kv": huge_kv, "llama": wrong_arch, "dir": root,
            "missing": root / "absent.gguf"}


LONG_PROMPT = " ".join(f"word{i}" for i in range(200))
TOO_MANY = ",".join(["1"] * (CONTEXT + 1))

# (argv after the command name, exit code, what the message must contain)
EXPORT = [
    (["{model}", "--tokens", "1,-5"], 1, "token id -5 at position 1 is out of range [0, 300)"),
    (["{model}", "--tokens", f"1,{VOCAB}"], 1, f"token id {VOCAB} at position 1 is out of range"),
    (["{model}", "--tokens", ""], 1, "--tokens is empty"),
    (["{model}", "--tokens", "1,x"], 1, "'x' is not an integer token id"),
    (["{model}", "--tokens", TOO_MANY], 1, f"{CONTEXT + 1} tokens exceed the model's context length {CONTEXT}"),
    (["{model}", "--prompt", LONG_PROMPT], 1, f"exceed the model's context length {CONTEXT}"),
    (["{model}", "--tokens", "1", "--rope-theta", "-1"], 1, "rope_theta"),
    (["{model}", "--tokens", "1", "--top-k", "0"], 2, "Invalid value for '--top-k'"),
    (["{model}", "--tokens", "1", "--top-k", "abc"], 2, "Invalid value for '--top-k'"),
    (["{missing}", "--tokens", "1"], 1, "no such file"),
    (["{dir}", "--tokens", "1"], 1, "not a regular file"),
    (["{not_gguf}", "--tokens", "1"], 1, "not a GGUF file (magic b'hell'"),
    (["{huge_kv}", "--tokens", "1"], 1, f"n_kv = {2**63}"),
    (["{llama}", "--tokens", "1"], 1, "general.architecture is 'llama'"),
]

GENERATE = [
    (["{model}", "--tokens", "-1"], 1, "token id -1 at position 0 is out of range"),
    (["{model}", "--tokens", "2,999999"], 1, "token id 999999 at position 1 is out of range"),
    (["{model}", "--tokens", " , "], 1, "--tokens is empty"),
    (["{model}", "--tokens", "1.5"], 1, "'1.5' is not an integer token id"),
    (["{model}", "--tokens", TOO_MANY], 1, f"exceed the model's context length {CONTEXT}"),
    (["{model}", "--tokens", "1", "--temperature", "-0.5"], 1, "temperature must be >= 0, got -0.5"),
    (["{model}", "--tokens", "1", "--temperature", "nan"], 1, "temperature must be finite, got nan"),
    (["{model}", "--tokens", "1", "--top-p", "0"], 1, "top_p must be in (0, 1], got 0.0"),
    (["{model}", "--tokens", "1", "--top-p", "1.5"], 1, "top_p must be in (0, 1], got 1.5"),
    (["{model}", "--tokens", "1", "--top-k", "-1"], 1, "top_k must be >= 0"),
    (["{model}", "--tokens", "1", "--min-p", "-0.1"], 1, "min_p must be in [0, 1], got -0.1"),
    (["{model}", "--tokens", "1", "--min-p", "1.5"], 1, "min_p must be in [0, 1], got 1.5"),
    (["{model}", "--tokens", "1", "--repeat-penalty", "0"], 1, "repeat_penalty must be > 0"),
    (["{model}", "--tokens", "1", "--max-tokens", "-1"], 1, "max_tokens must be >= 0, got -1"),
    (["{model}", "--tokens", "1", "--temperature", "hot"], 2, "Invalid value for '--temperature'"),
    (["{model}", "--tokens", "1", "--top-k", "1.5"], 2, "Invalid value for '--top-k'"),
    (["{model}", "--tokens", "1", "--top-p", ""], 2, "Invalid value for '--top-p'"),
    (["{model}", "--tokens", "1", "--max-tokens", "ten"], 2, "Invalid value for '--max-tokens'"),
    (["{model}", "--tokens", "1", "--seed", "x"], 2, "Invalid value for '--seed'"),
    (["{missing}", "--prompt", "hi"], 1, "no such file"),
    (["{not_gguf}", "--prompt", "hi"], 1, "not a GGUF file"),
]

CASES = [("export", *c) for c in EXPORT] + [("generate", *c) for c in GENERATE]
PROGRESS = re.compile(r"( \.\.\.|: done in [0-9.]+ s)$")


EARLY = ("--tokens is empty", "is not an integer token id")  # refused before the model is loaded


def _id(case) -> str:
    command, args, code, _ = case
    words = [a if len(a) < 20 else a[:8] + "..." for a in args]
    return f"{command}-{code}-" + " ".join(w.strip("{}") for w in words)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_gives_one_error_line_and_no_traceback(cli, files, case):
    command, args, code, message = case
    argv = [command] + [a.format(**files) for a in args]
    if command == "export":
        argv += ["-o", "-"]
    proc = cli(*argv, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    if code == 2:  # click's usage message
        assert lines[0].startswith("Usage: ") and f"Error: {message}" in proc.stderr, proc.stderr
        return
    *before, last = lines
    assert last.startswith("error: ") and message in last, proc.stderr
    assert all(PROGRESS.search(line) for line in before), proc.stderr  # nothing but progress before it
    assert not any(line.startswith(("tracing", "prefill")) for line in before), proc.stderr  # no forward began
    if any(e in message for e in EARLY):
        assert before == [], proc.stderr  # a typo in --tokens does not wait for a (large) model to load


def test_quiet_bad_input_is_exactly_one_line(cli, files):
    proc = cli("-q", "export", files["model"], "--tokens", "1,-5", "-o", "-", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: token id -5 at position 1 is out of range [0, 300)\n"


def test_the_bad_files_are_what_they_claim(files):
    """Guard against a vacuous matrix: the small model itself is fine, the bad files are bad in the named way."""
    from engine.model import load_model

    assert load_model(files["model"]).config.context_length == CONTEXT
    assert struct.unpack("<Q", files["huge_kv"].read_bytes()[16:24])[0] == 2**63
