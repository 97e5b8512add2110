"""Tokenizer from GGUF metadata: gpt2-style byte-level BPE with the qwen2 pre-tokenizer.

What the file stores (`tokenizer.ggml.*`) is held as-is in `TokenizerData`; `Tokenizer` runs the BPE in
Hugging Face `tokenizers` (vocab and merges from the file, the qwen2 split regex, then the byte-level map).

Byte-level: every byte b is one printable unicode character (GPT-2's bytes_to_unicode), so a normal
token's string maps back to exact bytes; decoding joins the bytes, then decodes UTF-8 with replacement.

Special tokens, by `token_type` (gguf.TokenType), as llama.cpp and HF treat them:
- CONTROL (3: <|endoftext|>, <|im_start|>, <|im_end|>, ...) become ids only in template text
  (`encode_with_specials`). In user text (`encode`) their strings stay literal text, encoded byte by
  byte through the merges: a user cannot type `<|im_end|>\\n<|im_start|>system`.
- USER_DEFINED (4: <think>, <tool_call>, ... in Qwen3 files) are matched in both, as llama.cpp does with
  parse_special=false and HF does for added tokens that are not special.
Both decode to their own string, not through the byte map.

Builders for generated files: `train_byte_level_bpe` (a real BPE trained on some text) and
`synthetic_vocab` (no training, any size up to 151,936 in well under a second).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import TokenizerError

# The qwen2 pre-tokenizer split, as in Qwen2's tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2:
# contractions, letters with one leading non-letter, single digits (unlike gpt2, numbers are split into
# digits), punctuation runs with trailing newlines, newline runs, spaces not followed by text, spaces.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# gguf.TokenType values (2 unknown and 5 unused decode as their own text, like control tokens)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 3, 4, 6
_TOKEN_TYPES = range(0, 7)  # 0 is gguf's "undefined"; llama.cpp reads it as normal

# Plain ChatML, as Qwen3-Coder uses it: no default system prompt, no <think> block.
CHATML_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "merges": "tokenizer.ggml.merges",
    "token_types": "tokenizer.ggml.token_type",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "padding_token_id": "tokenizer.ggml.padding_token_id",
    "add_bos_token": "tokenizer.ggml.add_bos_token",
    "chat_template": "tokenizer.chat_template",
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control bytes, space, DEL, ... go to 256, 257, ... in byte order
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _type_name(value) -> str:
    return type(value).__name__


def _string_list(md: dict, key: str, *, required: bool) -> list[str]:
    value = md.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"{key} is missing")
        return []
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"{key} must be an array of strings, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TokenizerError(f"{key}[{i}] must be a string, got {_type_name(item)}")
    return list(value)


def _int(key: str, value) -> int:
    if isinstance(value, bool):
        raise TokenizerError(f"{key} must be an integer, got bool")
    try:
        return operator.index(value)  # int and numpy integers; floats and strings refused
    except TypeError:
        raise TokenizerError(f"{key} must be an integer, got {_type_name(value)}") from None


@dataclass
class TokenizerData:
    """Exactly what GGUF stores under tokenizer.ggml.* (and tokenizer.chat_template); index = token id."""

    tokens: list[str]  # byte-level strings for normal tokens, plain text for control/user-defined ones
    merges: list[str]  # "a b", highest priority first
    token_types: list[int]  # gguf.TokenType: 1 normal, 3 control, 4 user-defined, 6 byte, ...
    eos_token_id: int
    bos_token_id: int | None = None
    padding_token_id: int | None = None
    add_bos_token: bool = False
    model: str = "gpt2"
    pre: str = "qwen2"
    chat_template: str | None = None

    @classmethod
    def from_metadata(cls, md: dict) -> "TokenizerData":
        """Read and check the tokenizer keys of a GGUF metadata dict; TokenizerError names the bad key."""
        model = md.get(_KEYS["model"])
        if model is None:
            raise TokenizerError(f"{_KEYS['model']} is missing")
        if model != "gpt2":
            raise TokenizerError(f"{_KEYS['model']} is {model!r}; only 'gpt2' (byte-level BPE) is supported")
        pre = md.get(_KEYS["pre"], "qwen2")
        if not isinstance(pre, str):
            raise TokenizerError(f"{_KEYS['pre']} must be a string, got {_type_name(pre)}")

        tokens = _string_list(md, _KEYS["tokens"], required=True)
        n = len(tokens)
        if n == 0:
            raise TokenizerError(f"{_KEYS['tokens']} is empty")
        merges = _string_list(md, _KEYS["merges"], required=False)
        for i, m in enumerate(merges):
            if m.count(" ") != 1 or m.startswith(" ") or m.endswith(" "):
                raise TokenizerError(f"{_KEYS['merges']}[{i}] = {m[:40]!r} is not two tokens separated by a space")

        key = _KEYS["token_types"]
        types = md.get(key)
        if types is None:
            types = [TOKEN_NORMAL] * n
        if not isinstance(types, (list, tuple)):
            raise TokenizerError(f"{key} must be an array of integers, got {_type_name(types)}")
        if len(types) != n:
            raise TokenizerError(f"{key} has {len(types)} entries but {_KEYS['tokens']} has {n}")
        types = [_int(f"{key}[{i}]", t) for i, t in enumerate(types)]
        bad = next((i for i, t in enumerate(types) if t not in _TOKEN_TYPES), None)
        if bad is not None:
            raise TokenizerError(f"{key}[{bad}] = {types[bad]} is not a gguf token type (0..6)")

        def token_id(field: str) -> int | None:
            value = md.get(_KEYS[field])
            if value is None:
                return None
            value = _int(_KEYS[field], value)
            if not 0 <= value < n:
                raise TokenizerError(f"{_KEYS[field]} = {value} is not a token id in [0, {n})")
            return value

        eos = token_id("eos_token_id")
        if eos is None:
            raise TokenizerError(f"{_KEYS['eos_token_id']} is missing")
        add_bos = md.get(_KEYS["add_bos_token"], False)
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{_KEYS['add_bos_token']} must be a bool, got {_type_name(add_bos)}")
        template = md.get(_KEYS["chat_template"])
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{_KEYS['chat_template']} must be a string, got {_type_name(template)}")
        return cls(tokens=tokens, merges=merges, token_types=types, eos_token_id=eos,
                   bos_token_id=token_id("bos_token_id"), padding_token_id=token_id("padding_token_id"),
                   add_bos_token=add_bos, model=model, pre=pre, chat_template=template)

    def to_metadata(self) -> dict:
        """The inverse of from_metadata: GGUF key -> value; keys whose value is None are left out."""
        md = {key: getattr(self, field) for field, key in _KEYS.items()}
        return {k: (list(v) if isinstance(v, list) else v) for k, v in md.items() if v is not None}


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _assemble(tokens: list[str], merges: list[str], controls: Sequence[str], vocab_size: int, eos: str,
              chat_template: str | None) -> TokenizerData:
    """Normal tokens, then the control tokens, then unused <|extra_N|> controls up to vocab_size."""
    if eos not in controls:
        raise ValueError(f"eos {eos!r} must be one of the control tokens {list(controls)}")
    if len(tokens) + len(controls) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for {len(tokens)} tokens and {len(controls)} controls")
    extra = [f"<|extra_{i}|>" for i in range(vocab_size - len(tokens) - len(controls))]
    all_tokens = tokens + list(controls) + extra
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * (len(controls) + len(extra))
    # as in Qwen's own files: bos and padding are <|endoftext|>, and no BOS is added
    eot = all_tokens.index("<|endoftext|>") if "<|endoftext|>" in controls else None
    return TokenizerData(tokens=all_tokens, merges=merges, token_types=types, eos_token_id=all_tokens.index(eos),
                         bos_token_id=eot, padding_token_id=eot, chat_template=chat_template)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, control_tokens: Sequence[str] = CONTROL_TOKENS,
                         chat_template: str | None = CHATML_TEMPLATE, eos: str = "<|endoftext|>") -> TokenizerData:
    """Our own byte-level BPE trained with `tokenizers` on `texts`, with the qwen2 split.

    Exactly `vocab_size` tokens: the 256 byte characters, the learned merges, the control tokens
    (token_type 3), then unused <|extra_N|> controls when the text had fewer merges to learn.
    `eos`: '<|endoftext|>' for a base model, '<|im_end|>' for a chat model.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = _pre_tokenizer()
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(control_tokens), initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    hf.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return _assemble(tokens, merges, control_tokens, vocab_size, eos, chat_template)


# Characters the synthetic merges combine, most frequent in English and Python first.
_SYNTHETIC_CHARS = b" etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789_.,:;()[]{}=+-*/#'\"\n"


def synthetic_vocab(vocab_size: int, control_tokens: Sequence[str] = CONTROL_TOKENS,
                    chat_template: str | None = CHATML_TEMPLATE, eos: str = "<|endoftext|>") -> TokenizerData:
    """A valid byte-level BPE of exactly `vocab_size` tokens, without training (151,936 in well under a second).

    The 256 byte tokens, then every pair of common characters, then triples (a pair + a character), ...:
    each merge "a b" joins two tokens that already exist into a new one, so the merges are consistent
    and every token is reachable. Then the control tokens.
    """
    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in _SYNTHETIC_CHARS]
    need = vocab_size - 256 - len(control_tokens)
    tokens = [b2u[b] for b in range(256)]
    merges: list[str] = []
    level = chars  # the tokens of the current length, extended by one character per round
    while len(merges) < need:
        longer = []
        for a in level:
            for c in chars:
                if len(merges) == need:
                    break
                tokens.append(a + c)  # new: every token of this round is one character longer than the last
                merges.append(f"{a} {c}")
                longer.append(a + c)
        level = longer
    return _assemble(tokens, merges, control_tokens, vocab_size, eos, chat_template)


def _alternation(strings: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `strings`, longest first (so '<|im_end|>' wins over a shorter prefix)."""
    strings = sorted(set(strings), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


class Tokenizer:
    """Encode and decode with the vocabulary of a GGUF file (see the module docstring for special tokens)."""

    def __init__(self, data: TokenizerData, hf, control_ids: dict[str, int], user_ids: dict[str, int]):
        self.data = data
        self._hf = hf
        self._control_ids = control_ids
        self._special_ids = {**control_ids, **user_ids}
        self._user_re = _alternation(user_ids)
        self._special_re = _alternation(self._special_ids)

    @classmethod
    def from_data(cls, data: TokenizerData) -> "Tokenizer":
        """Build the BPE; TokenizerError when the vocabulary or the merges are inconsistent."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        tokens_key, merges_key = _KEYS["tokens"], _KEYS["merges"]
        vocab: dict[str, int] = {}
        for i, t in enumerate(data.tokens):
            if not t:
                raise TokenizerError(f"{tokens_key}[{i}] is empty")
            if vocab.setdefault(t, i) != i:
                raise TokenizerError(f"{tokens_key}[{i}] = {t[:40]!r} duplicates token {vocab[t]}")
        missing = [b for b, c in bytes_to_unicode().items() if c not in vocab]
        if missing:
            raise TokenizerError(f"{tokens_key} lacks the byte-level token of {len(missing)} byte(s), first 0x{missing[0]:02x}")
        control = {t: i for i, (t, k) in enumerate(zip(data.tokens, data.token_types)) if k == TOKEN_CONTROL}
        user = {t: i for i, (t, k) in enumerate(zip(data.tokens, data.token_types)) if k == TOKEN_USER_DEFINED}
        merges = []
        for i, m in enumerate(data.merges):
            a, _, b = m.partition(" ")
            # tokenizers panics (a BaseException, with a Rust backtrace) when a merge's result is unknown
            for part in (a, b, a + b):
                if part not in vocab:
                    raise TokenizerError(f"{merges_key}[{i}] = {m[:40]!r}: {part[:40]!r} is not a token")
            if a + b in control:  # the BPE could then produce a control id from user text
                raise TokenizerError(f"{merges_key}[{i}] = {m[:40]!r} produces the control token {a + b!r}")
            merges.append((a, b))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = _pre_tokenizer()
        return cls(data, hf, control, user)

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
    def control_tokens(self) -> dict[str, int]:
        """The control tokens' strings and ids (the strings that only template text may turn into ids)."""
        return dict(self._control_ids)

    @property
    def stop_token_ids(self) -> set[int]:
        """EOS, plus <|im_end|> and <|endoftext|> when the vocabulary has them as control tokens."""
        return {self.data.eos_token_id} | {self._control_ids[t] for t in STOP_TOKENS if t in self._control_ids}

    def token_id(self, text: str) -> int | None:
        """The id of a control or user-defined token by its text, e.g. '<|im_end|>'; None if there is none."""
        return self._special_ids.get(text)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False).ids) if text else []

    def _encode_split(self, text: str, pattern: re.Pattern | None) -> list[int]:
        if pattern is None:
            return self._encode_plain(text)
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            ids += self._encode_plain(text[pos:m.start()])
            ids.append(self._special_ids[m.group(0)])
            pos = m.end()
        return ids + self._encode_plain(text[pos:])

    def encode(self, text: str) -> list[int]:
        """User text -> ids. Control-token strings in it stay literal text; user-defined tokens are matched."""
        return self._encode_split(text, self._user_re)

    def encode_with_specials(self, text: str) -> list[int]:
        """Template output -> ids: control and user-defined token strings become their ids."""
        return self._encode_split(text, self._special_re)

    def _check(self, token) -> int:
        try:
            i = operator.index(token)
        except TypeError:
            raise TokenizerError(f"token id {token!r} is not an integer") from None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        return i

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for; control and user-defined tokens: their string in UTF-8."""
        i = self._check(token)
        text = self.data.tokens[i]
        if self.data.token_types[i] not in (0, TOKEN_NORMAL, TOKEN_BYTE):
            return text.encode("utf-8")
        u2b = unicode_to_bytes()
        if all(c in u2b for c in text):
            return bytes(u2b[c] for c in text)
        return text.encode("utf-8")  # not byte-level (a file from another converter): the text itself

    def token_text(self, token: int) -> str:
        """One token's text; a token holding part of a UTF-8 character shows U+FFFD."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; control tokens appear as their strings (e.g. '<|im_end|>')."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
