"""Layer stacks per layer (`layers_N`, as T5X stores them) or scanned, and their params.

`run_layers` applies a stack of layers (T5's encoder and decoder, the decoder-only
networks) with remat, as `layers_N` modules or, with the config's `scan_layers`, one
`layers` module scanned over a leading `layers` axis. Checkpoints keep the unscanned
names, so we stack on load and unstack on export; the conversion is one lazy view over
flat params (`relayout`), so a checkpoint reader converts slice by slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.errors import SoftpromptError

_STACKS = ("encoder", "decoder")
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

Index = tuple[slice, ...]
Read = Callable[[str, Index], np.ndarray]  # ('/'-path, slice of it) -> array


def run_layers(
    layer_cls: type[nn.Module],
    num_layers: int,
    x: jax.Array,
    *broadcast_args: Any,
    per_layer: Any = None,
    **layer_kwargs: Any,
) -> jax.Array:
    """Apply `num_layers` layers, as `layers_N` modules or one scanned `layers` stack.

    `layer_kwargs["config"]` sets `remat_policy` and `scan_layers`. Every layer gets `x` and
    `broadcast_args`, then `per_layer` (a tree of `[num_layers, ...]` arrays, e.g. key/value
    prefixes) sliced to its row when given; a scanned layer returns `(x, None)`.
    """
    cfg = layer_kwargs["config"]
    extra = () if per_layer is None else (per_layer,)
    if cfg.remat_policy != "none":
        layer_cls = nn.remat(
            layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
        )
    if cfg.scan_layers:
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(broadcast_args) + (0,) * len(extra),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(scanned=True, name="layers", **layer_kwargs)(x, *broadcast_args, *extra)
        return x
    for i in range(num_layers):
        layer_extra = jax.tree.map(lambda a, i=i: a[i], extra)
        x = layer_cls(name=f"layers_{i}", **layer_kwargs)(x, *broadcast_args, *layer_extra)
    return x


def is_scanned(keys: Iterable[str]) -> bool:
    """Whether flat '/'-paths hold a stacked `encoder/layers/...` or `decoder/layers/...`."""
    return any(key.split("/")[0] in _STACKS and key.split("/")[1:2] == ["layers"] for key in keys)


def relayout(
    shapes: Mapping[str, tuple[int, ...]], read: Read, scanned: bool, stack: Callable = np.stack
) -> tuple[dict[str, tuple[int, ...]], Read]:
    """Flat params (shapes and a slice reader) seen in the scanned or per-layer layout, lazily.

    A stacked key reads only the layers and slices asked for and `stack`s them; `layers_N`
    reads row N of the stored stack. Params in the wanted layout already pass through.
    """
    if is_scanned(shapes) == scanned:
        return dict(shapes), read
    views: dict[str, tuple[tuple[int, ...], Callable[[Index], np.ndarray]]] = {}
    per_layer: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        name, _, rest = key.partition("/")
        layer, _, leaf = rest.partition("/")
        if name not in _STACKS or not layer.startswith("layers"):
            views[key] = shape, functools.partial(read, key)
        elif scanned:  # stored per layer
            per_layer.setdefault(f"{name}/layers/{leaf}", []).append(key)
        else:  # stored stacked
            for i in range(shape[0]):
                row = lambda index, key=key, i=i: read(key, (slice(i, i + 1), *index))[0]
                views[f"{name}/layers_{i}/{leaf}"] = shape[1:], row
    for key, found in per_layer.items():
        name, _, leaf = key.split("/", 2)
        names = [f"{name}/layers_{i}/{leaf}" for i in range(len(found))]
        if sorted(found) != sorted(names):
            raise SoftpromptError(f"{key}: layers are not numbered 0..N-1: found {sorted(found)}")
        stacked = lambda index, names=names: stack(
            [read(names[i], index[1:]) for i in range(*index[0].indices(len(names)))]
        )
        views[key] = (len(names), *shapes[names[0]]), stacked
    read_view: Read = lambda key, index: views[key][1](index)
    return {key: shape for key, (shape, _) in views.items()}, read_view


def stack_layers(params: dict) -> dict:
    """`encoder/layers_N/...` -> `encoder/layers/...` with a leading layer axis."""
    return _relayout_tree(params, scanned=True)


def unstack_layers(params: dict) -> dict:
    """Inverse of `stack_layers`: back to T5X's `layers_N` names."""
    return _relayout_tree(params, scanned=False)


def _relayout_tree(params: dict, scanned: bool) -> dict:
    flat = flatten_dict(params, sep="/")
    shapes, read = relayout(
        {key: jnp.shape(value) for key, value in flat.items()},
        lambda key, index: flat[key][index],
        scanned,
        stack=jnp.stack,
    )
    whole = lambda shape: tuple(slice(None) for _ in shape)
    return unflatten_dict({tuple(key.split("/")): read(key, whole(s)) for key, s in shapes.items()})
