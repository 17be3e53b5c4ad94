"""User-facing errors.

Anything a user can fix (a recipe key, a data file, a CLI flag) raises :class:`RexError`.
The CLI prints its message (1-3 lines, naming the file, key and fix) and exits with code 2,
without a traceback unless ``REX_DEBUG=1``.
"""

from __future__ import annotations


class RexError(Exception):
    """An error caused by user input, with a message that says where and how to fix it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.detail = message
        super().__init__(message)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        return f"{where}: {self.detail}" if where else self.detail


class RecipeError(RexError):
    """A recipe cannot be loaded, validated or built."""


class DataError(RexError):
    """A data file is missing, corrupt or does not match what the recipe needs."""
