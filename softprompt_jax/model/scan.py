"""Convert params between per-layer (`layers_N`, as T5X stores them) and scanned layout.

With `T5Config.scan_layers`, each stack holds one `layers` subtree whose leaves
have a leading `layers` axis; checkpoints keep the unscanned names, so we
stack on load and unstack on export. The conversion is one lazy view over flat
params (`relayout`), so a checkpoint reader converts slice by slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.errors import SoftpromptError

_STACKS = ("encoder", "decoder")

Index = tuple[slice, ...]
Read = Callable[[str, Index], np.ndarray]  # ('/'-path, slice of it) -> array


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
