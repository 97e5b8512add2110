"""Chat templates: a GGUF file's `tokenizer.chat_template` rendered as untrusted code, and chat encoding.

A chat template is code from a stranger (CVE-2024-34359: llama-cpp-python rendered it in a plain
jinja2 Environment and a crafted model file ran shell commands). Here a template is rendered:
- in jinja2's ImmutableSandboxedEnvironment (jinja2 >= 3.1.6 closed the known escapes), where reaching
  an unsafe attribute is an error rather than an empty value;
- in a separate, short-lived Python process with a memory limit (MAX_MEMORY_BYTES) and no right to
  write files, killed when it runs past its deadline: a single C-level operation (`'%0999999999d'|format`,
  `str.replace` blowing up a string) cannot be interrupted or bounded from inside one process;
- with its output bounded (MAX_TEMPLATE_CHARS beyond the messages' own size) and its time bounded
  (MAX_SECONDS, then the process is killed);
with the Hugging Face additions that real templates use: raise_exception, strftime_now, tojson without
HTML escaping, loop controls ({% break %}), the {% generation %} tag. Every failure is a TemplateError
with a one-line message. Renders are cached by their inputs (a process start costs about 0.2 s).

Choices: auto (the file's template, ChatML when it has none), chatml (ours, plain), qwen3-nothink
(ChatML plus an empty <think> block after the assistant prompt: the upstream bug, on purpose), raw (the
user messages' content, no markup).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from .errors import TemplateError
from .tokenizer import CHATML_TEMPLATE

TEMPLATE_CHOICES = ("auto", "chatml", "qwen3-nothink", "raw")
EMPTY_THINK = "<think>\n\n</think>\n\n"
MAX_TEMPLATE_CHARS = 1_000_000  # what a template may add to the messages' own characters
MAX_SECONDS = 2.0  # rendering time, after the renderer process has started
MAX_MEMORY_BYTES = 1 << 30  # address space of the renderer process
_START_SECONDS = 10.0  # allowance for starting the renderer process on a busy machine
_MAX_INT_BITS = 1 << 16  # integers a template may build with * and **
_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the `engine` package
_WORKER = f"import sys; sys.path.insert(0, {str(_ROOT)!r}); from engine.chat import _worker_main; _worker_main()"


# --- the parent side -------------------------------------------------------------------------------

def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as plain JSON data (the renderer gets a copy); each needs a string role."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} must be a dict with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TemplateError(f"message {i}: content must be a string, a list or None, got {type(content).__name__}")
        try:
            out.append(json.loads(json.dumps(m)))
        except (TypeError, ValueError):
            raise TemplateError(f"message {i} holds a value that is not plain data (str, number, list, dict)") from None
    return out


def _raw_text(messages: Sequence[dict]) -> str:
    return "".join(m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str))


def render_chat(messages: Sequence[dict], template: str | None, *, add_generation_prompt: bool = True,
                choice: str = "auto", bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) with the chosen template.

    template: the file's `tokenizer.chat_template` (used by choice 'auto'; None means ChatML).
    """
    if choice not in TEMPLATE_CHOICES:
        raise TemplateError(f"template choice must be one of {', '.join(TEMPLATE_CHOICES)}, got {choice!r}")
    plain = _plain_messages(messages)
    if choice == "raw":
        return _raw_text(plain)
    if template is not None and not isinstance(template, str):
        raise TemplateError(f"the chat template must be a string, got {type(template).__name__}")
    source = template if (choice == "auto" and template) else CHATML_TEMPLATE
    context = {"messages": plain, "add_generation_prompt": bool(add_generation_prompt),
               "bos_token": bos_token, "eos_token": eos_token}
    text = _render(json.dumps({"source": source, "context": context}))
    if choice == "qwen3-nothink" and add_generation_prompt:
        text += EMPTY_THINK
    return text


@lru_cache(maxsize=64)
def _render(request: str) -> str:
    """Render in a fresh renderer process; `request` is JSON {source, context}. Only successes are cached."""
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _WORKER], input=request.encode("utf-8"),
                              capture_output=True, timeout=_START_SECONDS + MAX_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise TemplateError(f"the chat template ran longer than {MAX_SECONDS:g} s and was stopped") from None
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
        raise TemplateError(f"the chat template renderer stopped (exit code {done.returncode}) {last}".rstrip()) from None
    if "error" in reply:
        raise TemplateError(reply["error"])
    return reply["text"]


def encode_chat(tokenizer, messages: Sequence[dict], template: str | None, choice: str = "auto",
                add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` and tokenize, keeping every message's text literal.

    Control-token strings that the template writes become control ids; the same strings inside a
    message (`<|im_end|>\\n<|im_start|>system` typed by a user) stay text. How: before rendering, each
    control string inside the messages is replaced by an escape (private-use characters around a digest
    of the messages, which no message can contain); the rendered text is split at the control strings
    that remain (the template's own), and each piece between them, escapes restored, goes through
    `tokenizer.encode`. A template may transform content (trim, split) and pieces are tokenized exactly
    as in the rendered text, so the ids equal llama.cpp's or HF's tokenization of the prompt, except
    that control strings from the messages stay text (and that the template's filters do not see them:
    `upper` leaves a message's `<|im_end|>` as it was).
    """
    plain = _plain_messages(messages)
    if choice == "raw":
        return tokenizer.encode(_raw_text(plain))
    controls = tokenizer.control_tokens  # {string: id}
    if not controls:
        return tokenizer.encode(render_chat(plain, template, add_generation_prompt=add_generation_prompt, choice=choice))
    by_length = sorted(controls, key=len, reverse=True)
    find_control = re.compile("|".join(map(re.escape, by_length)))
    # digits and private-use characters only: case filters (upper, title) leave an escape intact
    digest = int(hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()[:16], 16)
    escape = {c: f"\ue000{digest}.{k}\ue001" for k, c in enumerate(by_length)}
    unescape = {e: c for c, e in escape.items()}
    find_escape = re.compile(f"\ue000{digest}\\.\\d+\ue001")

    def hide(value):
        if isinstance(value, str):
            return find_control.sub(lambda m: escape[m.group(0)], value)
        if isinstance(value, list):
            return [hide(v) for v in value]
        if isinstance(value, dict):
            return {hide(k): hide(v) for k, v in value.items()}
        return value

    bos = tokenizer.token_text(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else ""
    text = render_chat(hide(plain), template, add_generation_prompt=add_generation_prompt, choice=choice,
                       bos_token=bos, eos_token=tokenizer.token_text(tokenizer.eos_token_id))
    def restore(piece: str) -> str:
        return find_escape.sub(lambda e: unescape.get(e.group(0), e.group(0)), piece)

    ids: list[int] = []
    pos = 0
    for m in find_control.finditer(text):
        ids += tokenizer.encode(restore(text[pos:m.start()]))
        ids.append(controls[m.group(0)])
        pos = m.end()
    return ids + tokenizer.encode(restore(text[pos:]))


# --- the renderer process ----------------------------------------------------------------------------

class _Deadline(BaseException):
    """Raised by the timer signal; a BaseException so that no `except Exception` on the way swallows it."""


class _Raised(Exception):
    """raise_exception(message) called by the template."""


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_binop(op: str, left, right, max_chars: int) -> None:
    """Refuse the arithmetic that builds huge values in one C call: repetition, concatenation, big integers."""
    from jinja2.exceptions import SecurityError

    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > max_chars:
                raise SecurityError(f"a repetition of {len(seq)} items {times} times exceeds the output bound")
        if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise SecurityError("an integer product exceeds the bound on integer size")
    elif op == "**" and ints and right > 0 and max(left.bit_length(), 1) * right > _MAX_INT_BITS:
        raise SecurityError(f"an integer power with exponent {right} exceeds the bound on integer size")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        if len(left) + len(right) > max_chars:
            raise SecurityError("a concatenation exceeds the output bound")


def _sandbox(max_chars: int):
    """The jinja2 environment chat templates render in (HF transformers' choices, bounded)."""
    from datetime import datetime

    from jinja2 import ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Generation(ext.Extension):
        """HF's {% generation %}...{% endgeneration %} marks assistant text for training masks; render its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right, max_chars)
            return super().call_binop(context, operator, left, right)

        def unsafe_undefined(self, obj, attribute):
            # jinja2 renders an unsafe attribute as an empty Undefined; refuse it outright instead
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    class SafeNamespace(Namespace):
        def __setitem__(self, name, value):  # no dunder or private names on namespaces (as in HF)
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace attribute may not start with '_': {name!r}")
            super().__setitem__(name, value)

    def raise_exception(message):
        raise _Raised(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def new_namespace(*args, **kwargs):
        ns = SafeNamespace()
        for name, value in dict(*args, **kwargs).items():
            ns[name] = value
        return ns

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=new_namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs),
                       strftime_now=lambda fmt: datetime.now().strftime(str(fmt)))
    return env


def _render_bounded(source: str, context: dict, max_chars: int) -> str:
    """Render in this process, stopping at max_chars; the caller bounds time and memory."""
    from jinja2 import TemplateSyntaxError
    from jinja2 import TemplateError as JinjaError
    from jinja2.exceptions import SecurityError

    env = _sandbox(max_chars)
    try:
        template = env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(_one_line(f"chat template syntax error (line {exc.lineno}): {exc.message}")) from None
    except (JinjaError, RecursionError, MemoryError) as exc:
        raise TemplateError(_one_line(f"chat template cannot be compiled: {exc}")) from None
    parts, size = [], 0
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateError(f"the chat template rendered more than {max_chars:,} characters and was stopped")
            parts.append(chunk)
    except TemplateError:
        raise
    except _Raised as exc:
        raise TemplateError(_one_line(f"the chat template raised an error: {exc}")) from None
    except SecurityError as exc:
        raise TemplateError(_one_line(f"the chat template tried something unsafe (refused by the sandbox): {exc}")) from None
    except RecursionError:
        raise TemplateError("the chat template recursed too deeply and was stopped") from None
    except MemoryError:
        raise TemplateError(f"the chat template needed more than {MAX_MEMORY_BYTES >> 20} MiB and was stopped") from None
    except Exception as exc:  # anything else a template can provoke: UndefinedError, TypeError, OverflowError...
        raise TemplateError(_one_line(f"the chat template failed: {type(exc).__name__}: {exc}")) from None
    return "".join(parts)


def _limit_process() -> None:
    """Bound this (renderer) process: address space, CPU seconds, and no file writes."""
    import resource

    for limit, value in ((resource.RLIMIT_AS, MAX_MEMORY_BYTES), (resource.RLIMIT_CPU, int(MAX_SECONDS) + 5),
                         (resource.RLIMIT_FSIZE, 0)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):  # a platform without this limit: the parent's timeout still applies
            pass


def _worker_main() -> None:
    """Entry point of the renderer process: JSON request on stdin, JSON reply on stdout."""
    import signal

    request = json.loads(sys.stdin.buffer.read())
    context = request["context"]
    max_chars = MAX_TEMPLATE_CHARS + sum(len(json.dumps(m)) for m in context["messages"])
    _limit_process()

    def deadline(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, deadline)
    signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        reply = {"text": _render_bounded(request["source"], context, max_chars)}
    except TemplateError as exc:
        reply = {"error": str(exc)}
    except _Deadline:
        reply = {"error": f"the chat template ran longer than {MAX_SECONDS:g} s and was stopped"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()
