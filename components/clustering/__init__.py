"""Offline clustering of item vectors (run by data stages, never inside a training step)."""
