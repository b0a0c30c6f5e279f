"""Multi-head self-attention shared by both modalities (BEiT style).

q and v have biases, k has none (a k bias shifts every logit of a query
equally and cancels in the softmax). Logits and softmax are float32 whatever
the compute dtype. A key-padding mask keeps text padding from being attended.

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

  def __init__(self, dim: int, heads: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    k = dim // heads
    self.q_kernel = param(rngs, trunc_normal, (dim, heads, k),
                          ("embed", "heads", "kv"))
    self.k_kernel = param(rngs, trunc_normal, (dim, heads, k),
                          ("embed", "heads", "kv"))
    self.v_kernel = param(rngs, trunc_normal, (dim, heads, k),
                          ("embed", "heads", "kv"))
    self.q_bias = param(rngs, _zeros, (heads, k), ("heads", "kv"))
    self.v_bias = param(rngs, _zeros, (heads, k), ("heads", "kv"))
    self.out_kernel = param(rngs, trunc_normal, (heads, k, dim),
                            ("heads", "kv", "embed"))
    self.out_bias = param(rngs, _zeros, (dim,), ("embed",))
    self.dtype = dtype
    self.scale = k ** -0.5

  def __call__(self, x: jax.Array, kv_valid: jax.Array | None = None
               ) -> jax.Array:
    """Args: x [B, L, D]; kv_valid [B, L] bool (False = padding key)."""
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("bld,dhk->blhk", x, self.q_kernel[...].astype(dt))
    q = (q + self.q_bias[...].astype(dt)) * self.scale
    k = jnp.einsum("btd,dhk->bthk", x, self.k_kernel[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.v_kernel[...].astype(dt))
    v = v + self.v_bias[...].astype(dt)
    q, k, v = (constrain(t, _QKV) for t in (q, k, v))
    logits = jnp.einsum("blhk,bthk->bhlt", q, k,
                        preferred_element_type=jnp.float32)
    if kv_valid is not None:
      logits = jnp.where(kv_valid[:, None, None, :], logits,
                         jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = constrain(jnp.einsum("bhlt,bthk->blhk", probs, v), _QKV)
    y = jnp.einsum("blhk,hkd->bld", out, self.out_kernel[...].astype(dt))
    return y + self.out_bias[...].astype(dt)
