"""The one pydantic base class of the project: every recipe section, sweep spec, dataset
parameter block, import mapping and schema file is validated strictly."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors (never silently ignored), defaults are validated too, and a float
    must be finite (``lr: .inf`` would train to NaN metrics)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
