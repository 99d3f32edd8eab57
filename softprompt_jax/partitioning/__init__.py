"""Shard a frozen T5 and its prompt over a `(data, model)` device mesh and many hosts.

A run does, in order: `initialize_distributed()`, `make_mesh(data, model)`,
`rules = standard_logical_axis_rules()`, `param_shardings(cfg, mesh, rules)`,
`load_sharded(...)` (or `place(params, shardings)`), `partitioned_train_step(...)`,
then per step `global_batch(local_batch, mesh)`.
"""

from softprompt_jax.partitioning.memory import MemoryPlan, memory_plan, memory_table
from softprompt_jax.partitioning.mesh import make_mesh
from softprompt_jax.partitioning.multihost import (
    configure_logging,
    data_shard_info,
    global_batch,
    initialize_distributed,
    is_main_process,
    local_batch_size,
    seqio_shard_info,
    sync,
    to_host,
)
from softprompt_jax.partitioning.partitioned import (
    PartitionedFunction,
    partition,
    partitioned_eval_step,
    partitioned_train_step,
)
from softprompt_jax.partitioning.rules import PROMPT_RULES, Rules, standard_logical_axis_rules
from softprompt_jax.partitioning.shardings import (
    batch_sharding,
    param_shardings,
    param_specs,
    place,
    replicated,
    resolve_spec,
)

__all__ = [
    "PROMPT_RULES",
    "MemoryPlan",
    "PartitionedFunction",
    "Rules",
    "batch_sharding",
    "configure_logging",
    "data_shard_info",
    "global_batch",
    "initialize_distributed",
    "is_main_process",
    "local_batch_size",
    "make_mesh",
    "memory_plan",
    "memory_table",
    "param_shardings",
    "param_specs",
    "partition",
    "partitioned_eval_step",
    "partitioned_train_step",
    "place",
    "replicated",
    "resolve_spec",
    "seqio_shard_info",
    "standard_logical_axis_rules",
    "sync",
    "to_host",
]
