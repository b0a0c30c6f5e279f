"""Pre-LN Transformer block with layer scale, drop path and a choice of FFN.

FFN kinds:
  "dense": LayerNorm + MLP (the MIM decoder's blocks).
  "hard":  ModalityFFN, one LayerNorm + FFN per modality picked by the
           token's modality id (EVE's hard-router layers).
  "soft":  LayerNorm + ModalityMoE, E experts, top-k, modality-aware router
           (EVE's soft-router layers).

Legend: B batch, L sequence, D width, M modalities, E experts.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.attention import Attention
from eve_jax.model.layers import LayerNorm, MLP, drop_path, param
from eve_jax.model.moe import ModalityFFN, ModalityMoE, MoEStats
from eve_jax.model.moe_config import MoEConfig
from eve_jax.sharding import constrain

_TOKENS = ("act_batch", "act_seq", "act_embed")  # the residual stream


class Block(nnx.Module):
  """x + gamma_1 * attn(LN(x)), then x + gamma_2 * ffn(x)."""

  def __init__(
      self,
      dim: int,
      heads: int,
      mlp_dim: int,
      *,
      ffn: str,
      layer_scale_init: float | None,
      drop_path_rate: float,
      activation: str = "gelu",
      moe: MoEConfig | None = None,
      attention: str = "einsum",
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.ffn_kind = ffn
    self.norm1 = LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, impl=attention, dtype=dtype, rngs=rngs)
    if ffn == "dense":
      self.norm2 = LayerNorm(dim, dtype=dtype, rngs=rngs)
      self.ffn = MLP(
          dim, mlp_dim, activation=activation, dtype=dtype, rngs=rngs
      )
    elif ffn == "hard":
      self.norm2 = None  # ModalityFFN owns one LayerNorm per modality.
      self.ffn = ModalityFFN(
          dim, mlp_dim, activation=activation, dtype=dtype, rngs=rngs
      )
    elif ffn == "soft":
      self.norm2 = LayerNorm(dim, dtype=dtype, rngs=rngs)
      if moe is None:
        raise ValueError("a soft-router block needs its MoEConfig (moe=)")
      self.ffn = ModalityMoE(dim, mlp_dim, moe, dtype=dtype, rngs=rngs)
    else:
      raise ValueError(f"unknown ffn kind {ffn!r}")
    if layer_scale_init is None:
      self.gamma_1 = self.gamma_2 = None
    else:
      init = jax.nn.initializers.constant(layer_scale_init)
      self.gamma_1 = param(rngs, init, (dim,), ("norm",))
      self.gamma_2 = param(rngs, init, (dim,), ("norm",))
    self.drop_path_rate = drop_path_rate
    self.dtype = dtype

  def __call__(
      self,
      x: jax.Array,
      *,
      valid: jax.Array,
      modality: jax.Array | None = None,
      counts: Sequence[int] | None = None,
      rng: jax.Array | None = None,
      drop_path_rate: float | jax.Array | None = None,
  ) -> tuple[jax.Array, MoEStats | None]:
    """Args:
      x: [B, L, D] tokens.
      valid: [B, L] bool, False for padding (masked as keys, not routed).
      modality: [B, L] int32 modality ids (0 image, 1 text); "hard"/"soft".
      counts: static tokens per modality in every sequence ("hard" gather).
      rng: PRNG key for drop path, None at evaluation.
      drop_path_rate: overrides the rate given at construction; a scanned
        stack of blocks passes each layer's rate as a scalar array.

    Returns:
      ([B, L, D] tokens, MoEStats for a "soft" block else None).
    """
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    rng1 = rng2 = None
    if rng is not None:
      rng1, rng2 = jax.random.split(rng)
    with jax.named_scope("attention"):
      h = self.attn(self.norm1(x), valid)
      if self.gamma_1 is not None:
        h = h * self.gamma_1[...].astype(h.dtype)
      x = constrain(x + drop_path(h, rate, rng1), _TOKENS)
    stats = None
    with jax.named_scope(f"ffn_{self.ffn_kind}"):
      if self.ffn_kind == "dense":
        h = self.ffn(self.norm2(x))
      elif self.ffn_kind == "hard":
        h = self.ffn(x, modality, counts)
      else:
        h, stats = self.ffn(self.norm2(x), modality, valid)
      if self.gamma_2 is not None:
        h = h * self.gamma_2[...].astype(h.dtype)
      x = x + drop_path(h.astype(x.dtype), rate, rng2)
      x = constrain(x, _TOKENS)
    return x, stats
