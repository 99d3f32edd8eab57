"""Jit the train and eval steps with explicit in/out shardings, under the mesh and the rules.

Like T5X's `PjittedFnWithContext`: every call (and so every trace) runs inside
`jax.set_mesh(mesh)` and `flax.linen.logical_axis_rules(rules)`, so the model's logical
activation constraints resolve to mesh axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from softprompt_jax.partitioning.rules import Rules, standard_logical_axis_rules
from softprompt_jax.partitioning.shardings import batch_sharding, replicated


class PartitionedFunction:
    """A `jax.jit`-ed function that always traces and runs under its mesh and axis rules."""

    def __init__(
        self,
        fn: Callable[..., Any],
        mesh: Mesh,
        rules: Rules,
        in_shardings: Any,
        out_shardings: Any,
        donate_argnums: Sequence[int] = (),
    ) -> None:
        self.mesh, self.rules = mesh, rules
        self._jitted = jax.jit(
            fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=tuple(donate_argnums),
        )

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical-axis rules the function is traced under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def __call__(self, *args: Any) -> Any:
        with self.context():
            return self._jitted(*args)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """Lower for these (possibly abstract) arguments: `.compile()`, `.memory_analysis()`."""
        with self.context():
            return self._jitted.lower(*args)


def partition(
    fn: Callable[..., Any],
    mesh: Mesh,
    in_shardings: Any,
    out_shardings: Any,
    *,
    rules: Rules | None = None,
    donate_argnums: Sequence[int] = (),
) -> PartitionedFunction:
    """Jit `fn` with these shardings (trees or prefixes of the arguments) under `mesh`."""
    rules = standard_logical_axis_rules() if rules is None else rules
    return PartitionedFunction(fn, mesh, rules, in_shardings, out_shardings, donate_argnums)


def partitioned_train_step(
    train_step: Callable[..., Any],
    mesh: Mesh,
    param_shardings: Any,
    *,
    rules: Rules | None = None,
    donate_state: bool = True,
) -> PartitionedFunction:
    """Jit `train_step(state, frozen_params, batch, rng) -> (state, metrics)` for the mesh.

    The state (prompt, optimizer slots, step) is replicated and donated: its buffers are reused
    for the new state, so pass each state once. Frozen params keep `param_shardings` and are
    never donated; batches are split over the data axis.
    """
    rules = standard_logical_axis_rules() if rules is None else rules
    everywhere = replicated(mesh)
    return partition(
        train_step,
        mesh,
        in_shardings=(everywhere, param_shardings, batch_sharding(mesh, rules), everywhere),
        out_shardings=(everywhere, everywhere),
        rules=rules,
        donate_argnums=(0,) if donate_state else (),
    )


def partitioned_eval_step(
    eval_step: Callable[..., Any], mesh: Mesh, param_shardings: Any, *, rules: Rules | None = None
) -> PartitionedFunction:
    """Jit `eval_step(state, frozen_params, batch) -> metrics` for the mesh (nothing donated)."""
    rules = standard_logical_axis_rules() if rules is None else rules
    everywhere = replicated(mesh)
    return partition(
        eval_step,
        mesh,
        in_shardings=(everywhere, param_shardings, batch_sharding(mesh, rules)),
        out_shardings=everywhere,
        rules=rules,
    )
