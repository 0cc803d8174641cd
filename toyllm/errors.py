"""Typed errors. The CLI turns every `ToyLLMError` into one line on stderr and exit code 2.

Library code raises these (never `SystemExit`) so that Python callers can catch them and read the message.
"""


class ToyLLMError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class InvalidArgumentError(ToyLLMError, ValueError):
    """A parameter is out of range (a sampling knob, a length, a device)."""


class ModelNotFoundError(ToyLLMError):
    """The name is neither a preset, a local checkpoint nor a Hub id we could resolve."""


class CheckpointError(ToyLLMError):
    """A checkpoint exists but is missing files, truncated, corrupt or of another architecture."""


class HubUnavailableError(ToyLLMError):
    """The Hugging Face Hub cannot be reached and the model is not in the local cache."""


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """A count from the user (sequences, batch size, repeats): at least `minimum`, and below 2**63, since counts reach
    torch as int64 and past that fail deep inside it with a bare overflow."""
    if not minimum <= value < 2**63:
        raise InvalidArgumentError(f"{name} must be in {minimum}..2**63 - 1, got {value}")
