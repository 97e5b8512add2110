"""Token ids and prompts where they enter the engine (robustness.md item 7), below the CLI and the app:
engine.session.check_tokens and parse_token_list, and generate() refusing before any forward runs."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError
from engine.generate import generate
from engine.sampler import SamplingParams
from engine.session import check_tokens, encode_prompt, parse_token_list


@pytest.fixture(scope="module")
def small(model_factory):
    from engine.model import load_model

    return load_model(model_factory(n_layers=1, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                                    n_experts_used=2, moe_ff=32, vocab_size=300, tokenizer="synthetic",
                                    context_length=16))


@pytest.mark.parametrize("ids, message", [
    ([], "the prompt has no tokens"),
    ([1, -1], "token id -1 at position 1 is out of range [0, 300)"),
    ([300], "token id 300 at position 0 is out of range [0, 300)"),
    ([2**63], "out of range"),
    ([1, 2.0], "token 1 is 2.0, not an integer id"),
    ([True], "not an integer id"),
    (["5"], "not an integer id"),
    ([None], "not an integer id"),
    ([1] * 17, "17 tokens exceed the model's context length 16"),
])
def test_check_tokens_refuses(small, ids, message):
    with pytest.raises(InputError) as e:
        check_tokens(small, ids)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_tokens_accepts_numpy_ids_and_the_full_context(small):
    out = check_tokens(small, np.arange(16, dtype=np.int32))
    assert out.dtype == np.int64 and out.tolist() == list(range(16))


@pytest.mark.parametrize("text, message", [
    ("", "--tokens is empty"), (" , ,", "--tokens is empty"), ("1,x", "'x' is not an integer token id"),
    ("1;2", "'1;2'"), ("0x10", "'0x10'"), ("1e3", "'1e3'"), ("1.5", "'1.5'"),
])
def test_parse_token_list_refuses(text, message):
    with pytest.raises(InputError) as e:
        parse_token_list(text)
    assert message in str(e.value)


def test_parse_token_list_reads_spaces_and_signs():
    assert parse_token_list(" 3, 14 ,-1,") == [3, 14, -1]  # -1 is refused later, against the vocabulary


def test_a_prompt_longer_than_the_context_is_refused(small):
    ids = encode_prompt(small, " ".join(f"w{i}" for i in range(100)))
    assert len(ids) > 16
    with pytest.raises(InputError, match="context length 16"):
        check_tokens(small, ids)


@pytest.mark.parametrize("ids", [[], [-3], [300], [1] * 17])
def test_generate_refuses_before_the_first_forward(small, ids, monkeypatch):
    import engine.generate as G

    def no_forward(*a, **k):
        raise AssertionError("the forward ran")

    monkeypatch.setattr(G, "forward", no_forward)
    with pytest.raises(InputError):
        next(iter(generate(small, ids, SamplingParams(max_tokens=2, seed=0))))
