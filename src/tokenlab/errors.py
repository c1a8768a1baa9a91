"""Exceptions that end a command with a message for the user instead of a traceback (``cli.main`` catches them).

Kept free of torch so that the CLI can name them without importing the engine.
"""

from __future__ import annotations

__all__ = ["TrainingAborted"]


class TrainingAborted(RuntimeError):
    """A run stopped on purpose (non-finite losses, a dead peer rank); the last complete checkpoint is kept."""
