"""Typed errors raised where input enters the engine.

Every error carries a one-line message meant for the user: it names the field and the value.
The CLI turns these into `error: <message>` and exit code 1.
"""


class WorkbenchError(Exception):
    """Base of every error caused by the user's input (file, ids, parameters, template)."""


class GGUFFormatError(WorkbenchError):
    """The file is not a well-formed GGUF file (header, counts, offsets, sizes)."""


class ModelValidationError(WorkbenchError):
    """The GGUF file is well formed but is not a usable qwen3_moe model (tensors, shapes, metadata)."""


class UnsupportedTypeError(ModelValidationError):
    """A tensor uses a quantization type that no path of ours can read."""


class TokenizerError(WorkbenchError):
    """The tokenizer metadata is missing or inconsistent, or a token id is out of range."""


class TemplateError(WorkbenchError):
    """A chat template failed to render: syntax, sandbox violation, raise_exception, or a bound."""


class SamplingError(WorkbenchError):
    """A sampling parameter is out of its range."""


class InputError(WorkbenchError):
    """A prompt or token list that the model cannot take (empty, too long, ids out of range)."""


class NonFiniteError(WorkbenchError):
    """The forward produced NaN or Inf; the message names the first layer and slot where it appeared."""
