"""Chat templates, rendered in Jinja's ImmutableSandboxedEnvironment with bounded time and output.

A GGUF file's `tokenizer.chat_template` is code from a stranger (CVE-2024-34359: llama-cpp-python
rendered it in a plain Environment and a crafted model ran shell commands). Here it renders in the
immutable sandbox (jinja2 >= 3.1.6, which closed the known escapes), with `**` and `*` bounded, a
wall-clock deadline enforced by a trace hook, and an output cap. Every failure is a TemplateError.

Choices: auto (the file's template, ChatML when it has none), chatml, qwen3-nothink (ChatML plus an
empty <think> block after the assistant prompt: the upstream bug, on purpose), raw (the messages'
text, no markup).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from .errors import TemplateError
from .tokenizer import CHATML_TEMPLATE

TEMPLATE_CHOICES = ("auto", "chatml", "qwen3-nothink", "raw")
EMPTY_THINK = "<think>\n\n</think>\n\n"
MAX_OUTPUT_CHARS = 1_000_000
MAX_SECONDS = 2.0
_MAX_OPERAND = 1_000_000


def _environment():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_OUTPUT_CHARS:
                        raise SecurityError("a repetition would exceed the output bound")
            return super().call_binop(context, operator, left, right)

        def unsafe_undefined(self, obj, attribute):
            # the default renders an unsafe attribute as an empty Undefined; refuse it outright instead
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)

    def raise_exception(message):
        raise TemplateError(f"the chat template raised: {message}")

    env.globals["raise_exception"] = raise_exception
    return env, SecurityError


def _render_bounded(source: str, context: dict) -> str:
    from jinja2 import TemplateError as JinjaTemplateError

    env, SecurityError = _environment()
    try:
        template = env.from_string(source)
    except JinjaTemplateError as exc:
        raise TemplateError(f"chat template syntax error: {exc}".splitlines()[0]) from None
    deadline = time.monotonic() + MAX_SECONDS
    old = sys.gettrace()

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateError(f"the chat template ran longer than {MAX_SECONDS:g} s and was stopped")
        return tracer

    parts, size = [], 0
    sys.settrace(tracer)
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateError(f"the chat template rendered more than {MAX_OUTPUT_CHARS} characters and was stopped")
            parts.append(chunk)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"the chat template tried something the sandbox refuses: {exc}") from None
    except JinjaTemplateError as exc:
        raise TemplateError(f"the chat template failed: {exc}".splitlines()[0]) from None
    except RecursionError:
        raise TemplateError("the chat template recursed too deeply") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
            MemoryError) as exc:
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    finally:
        sys.settrace(old)
    return "".join(parts)


def render_chat(messages: Sequence[dict], template: str | None, *, add_generation_prompt: bool = True,
                choice: str = "auto", bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text for `messages` ([{role, content}]) with the chosen template."""
    if choice not in TEMPLATE_CHOICES:
        raise TemplateError(f"template must be one of {', '.join(TEMPLATE_CHOICES)}, got {choice!r}")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError("each message needs a string role and a string content")
    if choice == "raw":
        return "".join(m["content"] for m in messages)
    source = template if (choice == "auto" and template) else CHATML_TEMPLATE
    text = _render_bounded(source, {"messages": [dict(m) for m in messages],
                                    "add_generation_prompt": add_generation_prompt,
                                    "bos_token": bos_token, "eos_token": eos_token})
    if choice == "qwen3-nothink" and add_generation_prompt:
        text += EMPTY_THINK
    return text


def encode_chat(tokenizer, messages: Sequence[dict], template: str | None, *, choice: str = "auto",
                add_generation_prompt: bool = True) -> list[int]:
    """Render then tokenize, keeping every message's content literal.

    The template is rendered with a sentinel in place of each content; the template's own text is
    encoded with its control tokens, each content with `encode` (control strings in user text stay
    text: a user cannot inject `<|im_end|>\\n<|im_start|>system`).
    """
    if choice == "raw":
        return tokenizer.encode("".join(m["content"] for m in messages))
    sentinels = [f"\x00\x01msg{i}\x01\x00" for i in range(len(messages))]
    masked = [dict(m, content=s) for m, s in zip(messages, sentinels)]
    text = render_chat(masked, template, add_generation_prompt=add_generation_prompt, choice=choice)
    ids: list[int] = []
    pos = 0
    for m, s in zip(messages, sentinels):
        at = text.find(s, pos)
        if at < 0 or text.count(s) != 1:
            raise TemplateError("the chat template altered a message's content; cannot keep user text literal")
        ids += tokenizer.encode_with_specials(text[pos:at])
        ids += tokenizer.encode(m["content"])
        pos = at + len(s)
    return ids + tokenizer.encode_with_specials(text[pos:])
