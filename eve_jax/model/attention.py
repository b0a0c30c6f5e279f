"""Multi-head self-attention shared by both modalities (BEiT style).

q and v have biases, k has none (a k bias shifts every logit of a query
equally and cancels in the softmax). Logits and softmax are float32 whatever
the compute dtype. A key-padding mask keeps text padding from being attended.

`impl` picks how the softmax(QK^T)V core runs: "einsum" (the reference,
written out), "xla" or "cudnn" (`jax.nn.dot_product_attention`; cuDNN's
fused kernel on GPU wants sequence lengths that are multiples of 8, so the
sequence is padded with masked keys and the padding cut off again).

Legend: B batch, L query length, T key length, D width, H heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.layers import param, trunc_normal
from eve_jax.sharding import constrain

_QKV = ("act_batch", "act_seq", "act_heads", None)  # [B, L, H, K]

_zeros = jax.nn.initializers.zeros


class Attention(nnx.Module):
  """[B, L, D] -> [B, L, D] self-attention with an optional key mask."""

  def __init__(
      self,
      dim: int,
      heads: int,
      *,
      impl: str = "einsum",
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if impl not in ("einsum", "xla", "cudnn"):
      raise ValueError(
          f"attention impl: expected 'einsum', 'xla' or 'cudnn', "
          f"got {impl!r}"
      )
    self.impl = impl
    k = dim // heads
    self.q_kernel = param(
        rngs, trunc_normal, (dim, heads, k), ("embed", "heads", "kv")
    )
    self.k_kernel = param(
        rngs, trunc_normal, (dim, heads, k), ("embed", "heads", "kv")
    )
    self.v_kernel = param(
        rngs, trunc_normal, (dim, heads, k), ("embed", "heads", "kv")
    )
    self.q_bias = param(rngs, _zeros, (heads, k), ("heads", "kv"))
    self.v_bias = param(rngs, _zeros, (heads, k), ("heads", "kv"))
    self.out_kernel = param(
        rngs, trunc_normal, (heads, k, dim), ("heads", "kv", "embed")
    )
    self.out_bias = param(rngs, _zeros, (dim,), ("embed",))
    self.dtype = dtype
    self.scale = k**-0.5

  def __call__(
      self,
      x: jax.Array,
      kv_valid: jax.Array | None = None,
      kv: jax.Array | None = None,
  ) -> jax.Array:
    """Args: x [B, L, D] queries (and keys/values unless `kv`); kv_valid
    [B, T] bool (False = padding key); kv [B, T, D] keys/values for
    cross-attention (the NLVR2 fusion head)."""
    dt = self.dtype
    x = x.astype(dt)
    kv = x if kv is None else kv.astype(dt)
    q = jnp.einsum("bld,dhk->blhk", x, self.q_kernel[...].astype(dt))
    # The 1/sqrt(K) scale is applied here, so the cores below use scale 1.
    q = (q + self.q_bias[...].astype(dt)) * self.scale
    k = jnp.einsum("btd,dhk->bthk", kv, self.k_kernel[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", kv, self.v_kernel[...].astype(dt))
    v = v + self.v_bias[...].astype(dt)
    q, k, v = (constrain(t, _QKV) for t in (q, k, v))
    if self.impl == "einsum":
      out = _einsum_attention(q, k, v, kv_valid)
    else:
      out = _fused_attention(q, k, v, kv_valid, self.impl)
    out = constrain(out, _QKV)
    y = jnp.einsum("blhk,hkd->bld", out, self.out_kernel[...].astype(dt))
    return y + self.out_bias[...].astype(dt)


def _einsum_attention(q, k, v, kv_valid):
  """softmax(q k^T) v for q [B, L, H, K], k/v [B, T, H, K]; float32 logits."""
  logits = jnp.einsum(
      "blhk,bthk->bhlt", q, k, preferred_element_type=jnp.float32
  )
  if kv_valid is not None:
    logits = jnp.where(
        kv_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min
    )
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bhlt,bthk->blhk", probs, v)


def _fused_attention(q, k, v, kv_valid, impl: str, multiple: int = 8):
  """The same through `jax.nn.dot_product_attention` ("xla" or "cudnn"),
  the sequence padded to a multiple of `multiple` with masked keys."""
  b, length = q.shape[:2]
  pad = -length % multiple
  if kv_valid is None:
    kv_valid = jnp.ones((b, length), bool)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
  mask = kv_valid[:, None, None, :]  # [B, 1, 1, T]: broadcast over H, L
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=1.0, implementation=impl
  )
  return out[:, :length]
