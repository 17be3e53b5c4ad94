"""Helpers that several models use: none of them belongs to one paper's file."""

from __future__ import annotations


def item_fields(fields: dict[str, int], use_fields: list[str] | None) -> dict[str, int]:
    """The ``use_fields`` (default: ``item`` alone) of ``fields``, which must include ``item``."""
    names = use_fields or ["item"]
    if "item" not in names or not set(names) <= set(fields):
        raise ValueError(
            f"use_fields must include 'item' and come from the dataset's fields {sorted(fields)}"
        )
    return {name: fields[name] for name in names}
