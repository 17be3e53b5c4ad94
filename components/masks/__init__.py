"""Parameter masks: which elements of a model a training stage may change."""
