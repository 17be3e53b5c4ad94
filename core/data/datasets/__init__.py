"""Every built-in dataset builder, imported explicitly so each registers itself."""

from rex.data.datasets import amazon, movielens  # noqa: F401
