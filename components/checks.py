"""Argument checks that components share, so each raises the same clear message."""

from __future__ import annotations


def at_least(minimum: int, **values: int) -> None:
    """Raise ``ValueError`` naming every argument in ``values`` that is below ``minimum``."""
    low = {name: value for name, value in values.items() if value < minimum}
    if low:
        shown = ", ".join(f"{name}={value}" for name, value in low.items())
        raise ValueError(f"{' and '.join(low)} must be >= {minimum}, got {shown}")
