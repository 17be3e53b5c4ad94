"""Inference-time decoding: transforms of a model's scores that an evaluator applies before ranking."""
