"""Entry points shared by the CLI and the app: validated prompts in, token ids out.

Validation happens here, once, where input enters (architecture.md, principle 6); the forward and
its kernels then trust the ids they get.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .model import Model


def check_tokens(model: Model, ids: Sequence[int]) -> np.ndarray:
    """ids -> int64 array; InputError for an empty list, ids outside [0, vocab) or too many for the context."""
    vocab = model.config.vocab_size
    if len(ids) == 0:
        raise InputError("the prompt has no tokens")
    arr = np.asarray(list(ids), dtype=object)
    for pos, tid in enumerate(ids):
        if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)):
            raise InputError(f"token {pos} is {tid!r}, not an integer id")
        if not 0 <= int(tid) < vocab:
            raise InputError(f"token id {int(tid)} at position {pos} is out of range [0, {vocab})")
    if len(ids) > model.config.context_length:
        raise InputError(f"{len(ids)} tokens exceed the model's context length {model.config.context_length}")
    return arr.astype(np.int64)


def parse_token_list(text: str) -> list[int]:
    """'3838,374, 220' -> [3838, 374, 220]; InputError on anything that is not a comma-separated integer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError("--tokens is empty")
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise InputError(f"--tokens: {p!r} is not an integer token id") from None
    return out


def encode_prompt(model: Model, prompt: str, *, chat: bool = False, template: str = "auto",
                  system: str | None = None) -> list[int]:
    """Token ids of `prompt`: plain text, or a user turn rendered with the chat template (sandboxed).

    User text is always encoded as text: control-token strings in it never become control tokens.
    """
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{model.path.name} has no tokenizer metadata; pass token ids instead of a prompt")
    if not chat:
        ids = tok.encode(prompt)
        if getattr(tok, "add_bos", False) and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids
    from .chat import encode_chat

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_chat(tok, messages, model.chat_template, choice=template, add_generation_prompt=True)
