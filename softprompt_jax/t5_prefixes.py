"""Key/value prefixes for T5: Li & Liang's encoder and decoder prefixes, or PEFT's.

Two modes, told apart by the prefix tree's top-level key:

- `{"encoder": part, "decoder": part}`, the paper's mode (Li & Liang prefix BART's encoder and
  decoder): every encoder layer's and every decoder layer's self-attention sees P extra keys
  and values. Each part is plain, `{"key", "value"}` `[layers, P, heads, head_dim]` (P-tuning
  v2), or through its own MLP, `{"embedding", "mlp"}` (`prefixes.py`), whose table
  splits as a decoder-only prefix's. (Li & Liang's code also prefixes the cross-attention;
  this does not.)
- `{"peft": part}`, PEFT's `PrefixTuningConfig` on T5 exactly: one table `[P, num_layers * 2 *
  d_model]` (plain: `{"table"}`; or through the MLP) viewed as `[P, 2 * num_layers, heads,
  d_model // heads]`, which PEFT doubles for self- and cross-attention and hands to Hugging
  Face T5 as the decoder cache, resetting the cross-attention cache. So it reaches only the
  decoder's self-attention (not the encoder, not the cross-attention), and decoder layer i
  reads entries `4i mod 2L` (keys) and `4i + 1 mod 2L` (values): with an even number of
  layers, layers share entries. This differs from the paper's method.

Either way the prefix's keys take positions 0..P-1 and the tokens P.. for T5's relative
position bias (where Hugging Face puts a cache of P entries), and are always visible.
Files (`.npz` in either mode, PEFT's adapter dir in PEFT's): `checkpoints/prefix_files.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.checkpoints.prefix_files import split_table
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.network import T5
from softprompt_jax.prefixes import init_mlp, prefix_table

MODES = ("paper", "peft")
KeyValues = tuple[jax.Array, jax.Array]


def is_t5_prefix(prompt: Any) -> bool:
    """Whether `prompt` is a T5 prefix tree (either mode)."""
    return isinstance(prompt, Mapping) and set(prompt) in ({"encoder", "decoder"}, {"peft"})


def init_t5_prefix(
    cfg: T5Config,
    length: int,
    projection_dim: int | None = None,
    seed: int = 0,
    mode: str = "paper",
) -> dict:
    """A new float32 T5 prefix of `length` positions; with `projection_dim`, through an MLP.

    Drawn as PEFT draws its `PrefixEncoder`: tables and embeddings N(0, 1), linear layers
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    if mode not in MODES:
        raise SoftpromptError(f"PREFIX_MODE must be one of {MODES}, got {mode!r}")
    if length <= 0:
        raise SoftpromptError(f"prefix length must be positive, got {length}")
    rng = np.random.default_rng(seed)
    width = cfg.num_heads * cfg.head_dim
    if mode == "peft":
        _check_peft_shape(cfg)
        layers = cfg.num_decoder_layers
        if projection_dim is None:
            return {"peft": {"table": _normal(rng, (length, layers * 2 * width))}}
        return {"peft": init_mlp(rng, length, width, layers * 2 * width, projection_dim)}
    parts = {}
    for part, layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        if projection_dim is None:
            table = _normal(rng, (length, layers * 2 * width))
            parts[part] = split_table(table, layers, cfg.num_heads)
        else:
            parts[part] = init_mlp(rng, length, width, layers * 2 * width, projection_dim)
    return parts


def t5_key_values(cfg: T5Config, prefix: Mapping) -> dict[str, KeyValues | None]:
    """`{"encoder": (k, v) or None, "decoder": (k, v)}`, each `[layers, P, heads, head_dim]`."""
    if not is_t5_prefix(prefix):
        raise SoftpromptError(
            f"a T5 prefix has keys ['decoder', 'encoder'] or ['peft']; got {sorted(prefix)}"
        )
    cast = lambda kv: tuple(x.astype(cfg.compute_dtype) for x in kv)
    if "peft" in prefix:
        table = prefix_table(prefix["peft"])
        return {"encoder": None, "decoder": cast(peft_decoder_key_values(cfg, table))}
    out = {}
    for name, layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        part = prefix[name]
        plain = (
            part
            if set(part) == {"key", "value"}
            else split_table(prefix_table(part), layers, cfg.num_heads)
        )
        out[name] = cast((jnp.asarray(plain["key"]), jnp.asarray(plain["value"])))
    return out


def peft_decoder_key_values(cfg: T5Config, table: jax.Array) -> KeyValues:
    """Each decoder layer's keys and values as PEFT reads them from its table (module doc)."""
    layers = cfg.num_decoder_layers
    rows = jnp.asarray(table).reshape(table.shape[0], 2 * layers, cfg.num_heads, -1)
    rows = jnp.transpose(rows, (1, 0, 2, 3))  # [2L, P, heads, head_dim]
    keys = np.array([(4 * i) % (2 * layers) for i in range(layers)])
    return rows[keys], rows[keys + 1]


def t5_prefix_encode(
    cfg: T5Config, params: Mapping[str, Any], prefix: Mapping, encoder_input_tokens: jax.Array
) -> tuple[jax.Array, jax.Array, KeyValues]:
    """The encoder's output (with the encoder prefix, if any), its mask and the decoder's prefix.

    Decode from them with `decoding.decode` or `decoding.beam_search` (`prefix=` the third):
    the encoder runs once and the decoder steps through its cache, the prefix beside it.
    """
    kv = t5_key_values(cfg, prefix)
    model = T5(cfg)
    encoded = model.apply(
        {"params": params},
        encoder_input_tokens,
        enable_dropout=False,
        prefix=kv["encoder"],
        method=model.encode,
    )
    return encoded, encoder_input_tokens > 0, kv["decoder"]


@functools.partial(jax.jit, static_argnames="cfg")
def t5_prefix_logits(
    cfg: T5Config,
    params: Mapping[str, Any],
    prefix: Mapping,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array | None = None,
) -> jax.Array:
    """Teacher-forced float32 logits `[b, target_len, vocab]` of T5 with a prefix."""
    encoded, mask, decoder_prefix = t5_prefix_encode(cfg, params, prefix, encoder_input_tokens)
    model = T5(cfg)
    return model.apply(
        {"params": params},
        encoded,
        mask,
        decoder_input_tokens,
        decoder_target_tokens,
        enable_dropout=False,
        prefix=decoder_prefix,
        method=model.decode,
    )


def _check_peft_shape(cfg: T5Config) -> None:
    if cfg.num_heads * cfg.head_dim != cfg.emb_dim:
        raise SoftpromptError(
            f"PREFIX_MODE='peft' needs num_heads * head_dim == emb_dim (PEFT views its table "
            f"with d_model // num_heads); the model has {cfg.num_heads} * {cfg.head_dim} != "
            f"{cfg.emb_dim}"
        )


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def check_t5_prefix(cfg: T5Config, prefix: Mapping, source: str) -> None:
    """Raise SoftpromptError naming the file and both shapes when `prefix` does not fit `cfg`."""
    if not is_t5_prefix(prefix):
        raise SoftpromptError(
            f"prefix {source} has keys {sorted(prefix)}; a T5 prefix has ['decoder', 'encoder'] "
            "or ['peft']"
        )
    layers = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
    for part, kv in t5_key_values(cfg, prefix).items():
        want = (layers[part], None, cfg.num_heads, cfg.head_dim)
        if kv is not None and any(w not in (None, g) for w, g in zip(want, kv[0].shape)):
            shown = tuple("P" if w is None else w for w in want)
            raise SoftpromptError(
                f"prefix {source} gives {part} keys of shape {kv[0].shape}; the model expects "
                f"{shown}"
            )
