"""The T5 network: config dataclass, named sizes and the Flax module."""

from softprompt_jax.model.config import (
    NAMED_CONFIGS,
    T5Config,
    cast_params,
    get_config,
    infer_config_from_shapes,
    param_dtype,
)
from softprompt_jax.model.network import T5, init_params, logical_axes, param_shapes

__all__ = [
    "NAMED_CONFIGS",
    "T5",
    "T5Config",
    "cast_params",
    "get_config",
    "infer_config_from_shapes",
    "init_params",
    "logical_axes",
    "param_dtype",
    "param_shapes",
]
