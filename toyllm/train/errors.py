"""Errors of the training pipeline. All are `ToyLLMError`s, so the CLI prints one line and exits with code 2."""

from toyllm.errors import CheckpointError, InvalidArgumentError, ToyLLMError

__all__ = ["CheckpointError", "DataError", "InvalidArgumentError", "TrainingDivergedError"]


class DataError(ToyLLMError):
    """The corpus or a prepared directory cannot be used: empty, not UTF-8, too short, missing or corrupt."""


class TrainingDivergedError(ToyLLMError):
    """The loss became NaN or infinite. Training stops; the last checkpoint on disk is the last good one."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
