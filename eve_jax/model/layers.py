"""Small building blocks shared by the encoder, the MIM decoder and the heads.

Every parameter carries logical axis names in its `out_sharding` metadata (`embed`,
`mlp`, `heads`, `kv`, `vocab`, `expert`, ...); `eve_jax.sharding` maps them
to mesh axes. Layers compute in `dtype` and keep parameters in float32.

Legend: B batch, L sequence, D width, F hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model import batch_random

LN_EPS = 1e-6
trunc_normal = jax.nn.initializers.truncated_normal(stddev=0.02)


def param(
    rngs: nnx.Rngs,
    init,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
  """A parameter initialized by `init`, named by logical `axes`."""
  assert len(shape) == len(axes), (shape, axes)
  # eager_sharding=False: the names are recorded (nnx.get_partition_spec
  # reads them) but applied only by a jitted init under a mesh.
  return nnx.Param(
      init(rngs.params(), tuple(shape), dtype),
      out_sharding=tuple(axes),
      eager_sharding=False,
  )


def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, dtype, eps: float = LN_EPS
) -> jax.Array:
  """LayerNorm over the last axis (eps 1e-6), statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
      dtype
  )


def activation_fn(name: str):
  """`gelu` (exact erf, as BEiT) or `quick_gelu` (x * sigmoid(1.702 x))."""
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "quick_gelu":
    # What the released EVE (CLIP-style) weights were trained with.
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"activation: expected 'gelu' or 'quick_gelu', got {name!r}")


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis: [..., D_in] -> [..., D_out]."""

  def __init__(
      self,
      d_in: int,
      d_out: int,
      *,
      axes=("embed", "mlp"),
      use_bias: bool = True,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.kernel = param(rngs, trunc_normal, (d_in, d_out), axes)
    self.bias = (
        param(rngs, jax.nn.initializers.zeros, (d_out,), axes[1:])
        if use_bias
        else None
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum(
        "...d,df->...f",
        x.astype(self.dtype),
        self.kernel[...].astype(self.dtype),
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm (eps 1e-6 unless given) computed in float32, returned in
  `dtype`."""

  def __init__(
      self, dim: int, *, eps: float = LN_EPS, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.dtype, self.eps)


class MLP(nnx.Module):
  """Dense FFN: [..., D] -> Linear(D, F) -> act -> Linear(F, D)."""

  def __init__(
      self,
      dim: int,
      hidden: int,
      *,
      activation: str = "gelu",
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation_fn(self.activation)(self.fc1(x)))


def drop_path(
    x: jax.Array, rate: float | jax.Array, rng: jax.Array | None
) -> jax.Array:
  """Stochastic depth: zero a sample's whole residual branch with prob `rate`.

  Args:
    x: [B, ...] the residual branch.
    rate: drop probability, a float or a scalar array (a scanned layer's
      rate); a float 0 or `rng is None` (evaluation) is the identity.
    rng: a PRNG key, or None.
  """
  if rng is None or (isinstance(rate, (int, float)) and rate <= 0.0):
    return x
  keep = batch_random.bernoulli(
      rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
