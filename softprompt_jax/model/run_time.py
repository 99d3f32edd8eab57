"""MODEL_OVERRIDES: run-time settings applied to a checkpoint's config, architecture refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import RUN_TIME_FIELDS
from softprompt_jax.model.decoder_config import DECODER_RUN_TIME_FIELDS, is_decoder_only


def with_overrides(cfg: Any, overrides: Mapping[str, Any] | None) -> Any:
    """`cfg` with `overrides` applied: only run-time fields, since the weights fix the rest."""
    overrides = dict(overrides or {})
    run_time = DECODER_RUN_TIME_FIELDS if is_decoder_only(cfg) else RUN_TIME_FIELDS
    allowed = sorted(run_time - {"dtype"})  # ACTIVATION_DTYPE sets the dtype
    fields = {f.name for f in dataclasses.fields(cfg)}
    family = type(cfg).__name__
    for key in overrides:
        if key == "dtype":
            raise SoftpromptError("MODEL_OVERRIDES key 'dtype': set ACTIVATION_DTYPE instead")
        if key not in allowed:
            what = "an architecture field (the weights fix it)" if key in fields else "no field"
            raise SoftpromptError(
                f"MODEL_OVERRIDES key {key!r} is {what} of {family}; only run-time fields may "
                f"be overridden: {allowed}"
            )
    return cfg.replace(**overrides)
