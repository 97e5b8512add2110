"""Tokenizer from GGUF metadata: gpt2-style byte-level BPE with the qwen2 pre-tokenizer.

The BPE itself runs in Hugging Face `tokenizers` (vocab and merges from `tokenizer.ggml.*`). Control
tokens (`token_type` 3: <|endoftext|>, <|im_start|>, <|im_end|>, ...) are NOT registered with it: we
split them out ourselves, and only where the text comes from a template (`encode_with_specials`).
User text goes through `encode`, where a control-token string stays literal text.

Byte-level: every byte b is a printable unicode character (GPT-2's bytes_to_unicode), so a token
string maps back to exact bytes; decoding joins bytes, then decodes UTF-8 with replacement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import TokenizerError

# The Qwen2 pre-tokenizer split (as in Qwen2's tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2):
# contractions, letters with one leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass
class TokenizerData:
    """Exactly what GGUF stores under tokenizer.ggml.* (and tokenizer.chat_template)."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    eos_token_id: int
    bos_token_id: int | None = None
    padding_token_id: int | None = None
    add_bos_token: bool = False
    model: str = "gpt2"
    pre: str = "qwen2"
    chat_template: str | None = None

    @classmethod
    def from_metadata(cls, md: dict) -> "TokenizerData":
        def need(key, kind):
            if key not in md:
                raise TokenizerError(f"tokenizer metadata {key} is missing")
            value = md[key]
            if not isinstance(value, kind):
                raise TokenizerError(f"tokenizer metadata {key} should be {kind.__name__}, got {type(value).__name__}")
            return value

        model = need("tokenizer.ggml.model", str)
        if model != "gpt2":
            raise TokenizerError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
        tokens = need("tokenizer.ggml.tokens", list)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("tokenizer.ggml.tokens must be a non-empty array of strings")
        merges = md.get("tokenizer.ggml.merges", [])
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise TokenizerError("tokenizer.ggml.merges must be an array of strings")
        types = md.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
        if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
            raise TokenizerError(
                f"tokenizer.ggml.token_type must be {len(tokens)} integers, got {len(types) if isinstance(types, list) else types!r}"
            )

        def opt_id(key):
            value = md.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
                raise TokenizerError(f"{key} = {value!r} is not a token id in [0, {len(tokens)})")
            return value

        eos = opt_id("tokenizer.ggml.eos_token_id")
        if eos is None:
            eos = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else None
        if eos is None:
            raise TokenizerError("tokenizer.ggml.eos_token_id is missing")
        template = md.get("tokenizer.chat_template")
        return cls(tokens=list(tokens), merges=list(merges), token_types=list(types), eos_token_id=eos,
                   bos_token_id=opt_id("tokenizer.ggml.bos_token_id"),
                   padding_token_id=opt_id("tokenizer.ggml.padding_token_id"),
                   add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)), model=model,
                   pre=str(md.get("tokenizer.ggml.pre", "qwen2")),
                   chat_template=template if isinstance(template, str) else None)

    def to_metadata(self) -> dict:
        md = {"tokenizer.ggml.model": self.model, "tokenizer.ggml.pre": self.pre, "tokenizer.ggml.tokens": self.tokens,
              "tokenizer.ggml.merges": self.merges, "tokenizer.ggml.token_type": self.token_types,
              "tokenizer.ggml.eos_token_id": self.eos_token_id, "tokenizer.ggml.add_bos_token": self.add_bos_token}
        for key, value in (("tokenizer.ggml.bos_token_id", self.bos_token_id),
                           ("tokenizer.ggml.padding_token_id", self.padding_token_id),
                           ("tokenizer.chat_template", self.chat_template)):
            if value is not None:
                md[key] = value
        return md


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _with_controls(tokens: list[str], merges: list[str], controls: Sequence[str], vocab_size: int,
                   eos: str, template: str | None) -> TokenizerData:
    if len(tokens) + len(controls) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for {len(tokens)} tokens and {len(controls)} controls")
    extra = [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens) - len(controls))]
    all_tokens = tokens + list(controls) + extra
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * (len(controls) + len(extra))
    eos_id = all_tokens.index(eos)
    pad = all_tokens.index("<|endoftext|>") if "<|endoftext|>" in all_tokens else None
    return TokenizerData(tokens=all_tokens, merges=merges, token_types=types, eos_token_id=eos_id,
                         padding_token_id=pad, chat_template=template)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, control_tokens: Sequence[str] = CONTROL_TOKENS,
                         chat_template: str | None = CHATML_TEMPLATE, eos: str = "<|endoftext|>") -> TokenizerData:
    """Our own byte-level BPE, trained with `tokenizers` on `texts`: 256 byte tokens, the learned merges,
    then the control tokens; exactly `vocab_size` tokens (padded with unused <|extra_N|> controls)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer()
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(control_tokens), initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    hf.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(hf.to_str())["model"]
    vocab = spec["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return _with_controls(tokens, merges, control_tokens, vocab_size, eos, chat_template)


def synthetic_vocab(vocab_size: int, control_tokens: Sequence[str] = CONTROL_TOKENS,
                    chat_template: str | None = CHATML_TEMPLATE) -> TokenizerData:
    """A valid byte-level BPE vocabulary of exactly `vocab_size` tokens without training (fast at 151,936):
    the 256 byte tokens, then pairs and triples of common characters, each merge joining existing tokens."""
    b2u = bytes_to_unicode()
    byte_tokens = [b2u[b] for b in range(256)]
    common = [b2u[b] for b in b" etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789_.,:()=\n"]
    need = vocab_size - 256 - len(control_tokens)
    tokens, merges, seen = list(byte_tokens), [], set(byte_tokens)
    level = common
    while len(merges) < need:
        nxt = []
        for a in level:
            for c in common:
                t = a + c
                if t in seen:
                    continue
                seen.add(t)
                tokens.append(t)
                merges.append(f"{a} {c}")
                nxt.append(t)
                if len(merges) == need:
                    break
            if len(merges) == need:
                break
        level = nxt
    return _with_controls(tokens, merges, control_tokens, vocab_size, "<|endoftext|>", chat_template)


@dataclass
class Tokenizer:
    data: TokenizerData
    _hf: object = field(repr=False, default=None)
    _special_re: object = field(repr=False, default=None)
    _control_ids: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_data(cls, data: TokenizerData) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        vocab = {}
        for i, t in enumerate(data.tokens):
            vocab.setdefault(t, i)
        merges = []
        for m in data.merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise TokenizerError(f"tokenizer.ggml.merges entry {m!r} is not two tokens")
            merges.append((a, b))
        try:
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        except Exception as exc:  # tokenizers raises plain Exception subclasses from Rust
            raise TokenizerError(f"tokenizer metadata does not form a BPE model: {exc}") from None
        hf.pre_tokenizer = _pre_tokenizer()
        controls = {t: i for i, (t, ty) in enumerate(zip(data.tokens, data.token_types)) if ty == TOKEN_CONTROL}
        special = re.compile("|".join(re.escape(t) for t in sorted(controls, key=len, reverse=True))) if controls else None
        return cls(data, hf, special, controls)

    @property
    def vocab_size(self) -> int:
        return len(self.data.tokens)

    @property
    def eos_token_id(self) -> int:
        return self.data.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.data.bos_token_id

    @property
    def add_bos(self) -> bool:
        return self.data.add_bos_token

    @property
    def stop_token_ids(self) -> set[int]:
        ids = {self.data.eos_token_id}
        for t in ("<|im_end|>", "<|endoftext|>"):
            if t in self._control_ids:
                ids.add(self._control_ids[t])
        return ids

    def token_id(self, text: str) -> int | None:
        """The id of a control token by its text, e.g. '<|im_end|>'."""
        return self._control_ids.get(text)

    def encode(self, text: str) -> list[int]:
        """User text -> ids. Control-token strings in it stay literal text."""
        if not text:
            return []
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_with_specials(self, text: str) -> list[int]:
        """Template output -> ids: control-token strings become their ids, the rest is encoded as text."""
        if self._special_re is None:
            return self.encode(text)
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            ids += self.encode(text[pos:m.start()])
            ids.append(self._control_ids[m.group(0)])
            pos = m.end()
        return ids + self.encode(text[pos:])

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size})")
        return i

    def token_bytes(self, i: int) -> bytes:
        i = self._check(i)
        t = self.data.tokens[i]
        if self.data.token_types[i] == TOKEN_CONTROL:
            return t.encode("utf-8")
        u2b = unicode_to_bytes()
        try:
            return bytes(u2b[c] for c in t)
        except KeyError:
            return t.encode("utf-8")

    def token_text(self, i: int) -> str:
        return self.token_bytes(i).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
