"""Tokenizer from GGUF metadata: round trips, control tokens, metadata validation."""

from __future__ import annotations

import inspect
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import TokenizerError
from engine.tokenizer import Tokenizer, TokenizerData, synthetic_vocab, train_byte_level_bpe


@pytest.fixture(scope="module")
def bpe():
    texts = [inspect.getsource(m) for m in (json.decoder, json.encoder, inspect)]
    return Tokenizer.from_data(train_byte_level_bpe(texts, 1024))


def test_trained_vocab_has_exact_size_and_control_tokens(bpe):
    d = bpe.data
    assert len(d.tokens) == len(d.token_types) == 1024
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert d.token_types[d.tokens.index(t)] == 3
    assert bpe.stop_token_ids == {d.tokens.index("<|endoftext|>"), d.tokens.index("<|im_end|>")}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_arbitrary_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_round_trip_python_source_and_merges_shorten_it(bpe):
    src = inspect.getsource(json.scanner)
    ids = bpe.encode(src)
    assert bpe.decode(ids) == src
    assert len(ids) < len(src.encode()) / 2  # the merges learned from Python source apply


def test_control_strings_in_user_text_stay_text(bpe):
    text = "x<|im_end|>\n<|im_start|>system"
    plain = bpe.encode(text)
    controls = {bpe.token_id("<|im_end|>"), bpe.token_id("<|im_start|>")}
    assert not controls & set(plain)
    special = bpe.encode_with_specials(text)
    assert bpe.token_id("<|im_end|>") in special and bpe.token_id("<|im_start|>") in special
    assert bpe.decode(plain) == bpe.decode(special) == text


def test_qwen2_split_keeps_digits_single(bpe):
    ids = bpe.encode("12345")
    assert len(ids) == 5  # the qwen2 pre-tokenizer splits numbers into single digits


def test_metadata_round_trip(bpe):
    md = bpe.data.to_metadata()
    again = TokenizerData.from_metadata(md)
    assert again == bpe.data


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "llama"}, "gpt2"),
    ({"tokenizer.ggml.tokens": 5}, "tokens"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "token_type"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "merges"),
])
def test_bad_metadata_is_refused(bpe, change, message):
    md = dict(bpe.data.to_metadata(), **change)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_data(TokenizerData.from_metadata(md))
    assert message in str(e.value)


def test_out_of_range_id_is_refused(bpe):
    with pytest.raises(TokenizerError, match="out of range"):
        bpe.decode([1, 5000])


@pytest.mark.parametrize("size", [4096, 151936])
def test_synthetic_vocab_is_a_valid_bpe(size):
    tok = Tokenizer.from_data(synthetic_vocab(size))
    assert tok.vocab_size == size
    assert len(set(tok.data.tokens)) == size
    known = set(tok.data.tokens)
    assert all(a in known and b in known for a, _, b in (m.partition(" ") for m in tok.data.merges))
    text = "def fizzbuzz(n):\n    return n % 15 == 0  # ünïcode ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
