"""The EVE backbone: one Transformer shared by image and text tokens.

Input = [image tokens ; text tokens] with an explicit modality-id array
(0 image, 1 text) carried alongside, never inferred from a position count:
the MIM pass has 1 + N/4 image tokens, the MLM pass 1 + N.
Blocks below the top `num_soft_layers` use the hard router (one FFN per
modality), the top ones the soft-router MoE.

Legend: B batch, Li image tokens (CLS + patches), Lt text tokens,
L = Li + Lt, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.block import Block
from eve_jax.model.embeddings import ImageEmbed, TextEmbed
from eve_jax.model.layers import LayerNorm, param, trunc_normal
from eve_jax.model.moe import MoEStats
from eve_jax.model.variants import ModelConfig
from eve_jax.sharding import constrain

IMAGE, TEXT = 0, 1


class EVE(nnx.Module):
  """Embeddings + pre-LN + blocks + final LN."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.image_embed = ImageEmbed(cfg.image_size, cfg.patch_size, cfg.width,
                                  dtype=dt, rngs=rngs)
    self.text_embed = TextEmbed(cfg.vocab_size, cfg.max_text_positions,
                                cfg.width, dtype=dt, rngs=rngs)
    self.type_embed = param(rngs, trunc_normal, (2, cfg.width),
                            (None, "embed"))
    self.pre_norm = LayerNorm(cfg.width, dtype=dt, rngs=rngs)
    # Stochastic depth grows linearly with depth (BEiT).
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1)
             for i in range(cfg.depth)]

    def dense_soft(i):  # the benchmark's same-active-FLOPs dense model
      return cfg.soft_layer(i) and cfg.soft_ffn == "dense"

    self.blocks = nnx.List([
        Block(cfg.width, cfg.heads,
              cfg.top_k * cfg.mlp_dim if dense_soft(i) else cfg.mlp_dim,
              ffn=("dense" if dense_soft(i) else
                   "soft" if cfg.soft_layer(i) else "hard"),
              layer_scale_init=cfg.layer_scale_init,
              drop_path_rate=rates[i], activation=cfg.activation,
              num_experts=cfg.num_experts, top_k=cfg.top_k,
              capacity_factor=cfg.capacity_factor,
              aux_loss_weight=cfg.aux_loss_weight,
              add_modality_to_experts=cfg.add_modality_to_experts,
              moe_dispatch=cfg.moe_dispatch, moe_experts=cfg.moe_experts,
              attention=cfg.attention,
              dtype=dt, rngs=rngs)
        for i in range(cfg.depth)])
    self.norm = LayerNorm(cfg.width, dtype=dt, rngs=rngs)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, 1 + N, D], positions and image type added."""
    with jax.named_scope("embed_image"):
      x = self.image_embed(images)
      return x + self.type_embed[...][IMAGE].astype(x.dtype)

  def embed_text(self, text: jax.Array) -> jax.Array:
    """[B, Lt] ids -> [B, Lt, D], positions and text type added."""
    with jax.named_scope("embed_text"):
      x = self.text_embed(text)
      return x + self.type_embed[...][TEXT].astype(x.dtype)

  def encode(self, image_tokens: jax.Array, text_tokens: jax.Array,
             text_valid: jax.Array, *, rng: jax.Array | None = None
             ) -> tuple[jax.Array, list[MoEStats]]:
    """Runs the shared stack over [image ; text].

    Args:
      image_tokens: [B, Li, D] from `embed_image` (all or only visible ones).
      text_tokens: [B, Lt, D] from `embed_text`.
      text_valid: [B, Lt] bool, False at padding.
      rng: PRNG key for drop path; None at evaluation.

    Returns:
      ([B, Li + Lt, D] final states, one MoEStats per soft-router block).
    """
    b, li, _ = image_tokens.shape
    lt = text_tokens.shape[1]
    x = jnp.concatenate([image_tokens, text_tokens.astype(image_tokens.dtype)],
                        axis=1)
    modality = jnp.concatenate(
        [jnp.full((b, li), IMAGE, jnp.int32),
         jnp.full((b, lt), TEXT, jnp.int32)], axis=1)
    valid = jnp.concatenate([jnp.ones((b, li), bool), text_valid], axis=1)
    counts = (li, lt)  # tokens per modality id, for the hard-router gather
    x = constrain(self.pre_norm(x), ("act_batch", "act_seq", "act_embed"))
    stats = []
    rngs = (jax.random.split(rng, len(self.blocks)) if rng is not None
            else [None] * len(self.blocks))
    def run(block, x, r):
      return block(x, valid=valid, modality=modality, counts=counts, rng=r)

    if self.cfg.remat:  # keep only block inputs; recompute the rest
      run = nnx.remat(run)
    for block, r in zip(self.blocks, rngs):
      x, s = run(block, x, r)
      if s is not None:
        stats.append(s)
    return self.norm(x), stats
