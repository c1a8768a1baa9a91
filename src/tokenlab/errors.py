"""Exceptions that end a command with a message for the user instead of a traceback (``cli.main`` catches them).

Kept free of torch so that the CLI can name them without importing the engine.
"""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "PeerFailureError", "TrainingAborted", "TrainingInterrupted"]


class TrainingAborted(RuntimeError):
    """A run stopped on purpose (non-finite losses, a dead peer rank); the last complete checkpoint is kept."""


class NonFiniteLossError(TrainingAborted):
    """Too many non-finite losses in a row."""


class PeerFailureError(TrainingAborted):
    """Another rank died or hangs: a collective got no answer within ``train.dist_timeout_s``."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped a training after it wrote a checkpoint (``checkpoint``: its path, or None).

    A ``KeyboardInterrupt``, so every caller that handles Ctrl-C handles it; ``signum`` is the signal received.
    """

    def __init__(self, message: str, checkpoint: object = None, signum: int = 2) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = signum
