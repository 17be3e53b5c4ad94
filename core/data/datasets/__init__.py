"""Every built-in dataset builder, imported explicitly so each registers itself."""

from rex.data.datasets import amazon, behavior, frappe, movielens, scientific  # noqa: F401
