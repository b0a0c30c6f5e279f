"""The EVE backbone: one Transformer shared by image and text tokens.

Input = [image tokens ; text tokens] with an explicit modality-id array
(0 image, 1 text) carried alongside, never inferred from a position count:
the MIM pass has 1 + N/4 image tokens, the MLM pass 1 + N.
Each block's FFN is what `ModelConfig.ffn_kinds` says: by default the hard
router (one FFN per modality) below the top `num_soft_layers` blocks and
the soft-router MoE in them; `model.ffn_plan` places shared (one FFN for
both modalities), hard and soft FFNs anywhere.

Legend: B batch, Li image tokens (CLS + patches), Lt text tokens,
L = Li + Lt, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from eve_jax.model.block import Block
from eve_jax.model.embeddings import ImageEmbed, TextEmbed
from eve_jax.model.layers import LayerNorm, param, trunc_normal
from eve_jax.model.moe import MoEStats
from eve_jax.model.variants import ModelConfig
from eve_jax.sharding import constrain

IMAGE, TEXT = 0, 1
# Scanned parameters' leading axis gets this logical name in their metadata.
_LAYERS = {nnx.PARTITION_NAME: "layers"}


def num_scanned(cfg: ModelConfig) -> int:
  """How many bottom blocks `scan_layers` stacks: the hard-router ones
  below the first block of another kind."""
  if not cfg.scan_layers:
    return 0
  kinds = cfg.ffn_kinds
  return next((i for i, k in enumerate(kinds) if k != "hard"), len(kinds))


def _stack(blocks: list[Block]) -> Block:
  """One Block whose every parameter is the blocks' stacked along a new
  leading axis, named `layers` in its sharding metadata. Its own
  `drop_path_rate` is unused: `EVE.encode` passes each layer's."""
  graphdef, _ = nnx.split(blocks[0])
  state = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks]
  )
  return nnx.merge(graphdef, spmd.add_axis(state, 0, _LAYERS))


class EVE(nnx.Module):
  """Embeddings + pre-LN + blocks + final LN."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.image_embed = ImageEmbed(
        cfg.image_size,
        cfg.patch_size,
        cfg.width,
        positions=cfg.position_embed,
        dtype=dt,
        rngs=rngs,
    )
    self.text_embed = TextEmbed(
        cfg.vocab_size,
        cfg.max_text_positions,
        cfg.width,
        positions=cfg.position_embed,
        dtype=dt,
        rngs=rngs,
    )
    self.type_embed = (
        param(rngs, trunc_normal, (2, cfg.width), (None, "embed"))
        if cfg.type_embed
        else None
    )
    self.pre_norm = (
        LayerNorm(cfg.width, dtype=dt, rngs=rngs) if cfg.pre_norm else None
    )
    # Stochastic depth grows linearly with depth (BEiT).
    self.rates = rates = tuple(
        cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)
    )

    def block(i, rngs, rate):
      kind = cfg.ffn_kinds[i]
      hidden = cfg.mlp_dim
      if kind == "soft" and cfg.soft_ffn == "dense":
        # The benchmark's comparison model: same active FLOPs, no experts.
        kind, hidden = "dense", cfg.top_k * cfg.mlp_dim
      return Block(
          cfg.width,
          cfg.heads,
          hidden,
          ffn="dense" if kind == "shared" else kind,
          layer_scale_init=cfg.layer_scale_init,
          drop_path_rate=rate,
          activation=cfg.activation,
          moe=cfg.moe,
          attention=cfg.attention,
          dtype=dt,
          rngs=rngs,
      )

    # Built unrolled in any case, so a model's initial values do not depend
    # on scan_layers; with it, the hard-router blocks (all alike) are then
    # stacked into one Block whose parameters carry a leading [num_scanned]
    # `layers` axis, and `blocks` keeps only the rest.
    blocks = [block(i, rngs, rates[i]) for i in range(cfg.depth)]
    self.num_scanned = n = num_scanned(cfg)
    self.scanned = _stack(blocks[:n]) if n else None
    self.blocks = nnx.List(blocks[n:])
    self.norm = LayerNorm(cfg.width, dtype=dt, rngs=rngs)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, 1 + N, D], positions and image type added."""
    with jax.named_scope("embed_image"):
      x = self.image_embed(images)
      if self.type_embed is None:
        return x
      return x + self.type_embed[...][IMAGE].astype(x.dtype)

  def embed_text(self, text: jax.Array) -> jax.Array:
    """[B, Lt] ids -> [B, Lt, D], positions and text type added."""
    with jax.named_scope("embed_text"):
      x = self.text_embed(text)
      if self.type_embed is None:
        return x
      return x + self.type_embed[...][TEXT].astype(x.dtype)

  def encode(
      self,
      image_tokens: jax.Array,
      text_tokens: jax.Array,
      text_valid: jax.Array,
      *,
      rng: jax.Array | None = None,
      final_norm: bool = True,
  ) -> tuple[jax.Array, list[MoEStats]]:
    """Runs the shared stack over [image ; text].

    Args:
      image_tokens: [B, Li, D] from `embed_image` (all or only visible ones).
      text_tokens: [B, Lt, D] from `embed_text`.
      text_valid: [B, Lt] bool, False at padding.
      rng: PRNG key for drop path; None at evaluation.
      final_norm: False returns the last block's states without the final
        LayerNorm (the released retrieval evaluation's features).

    Returns:
      ([B, Li + Lt, D] final states, one MoEStats per soft-router block).
    """
    b, li, _ = image_tokens.shape
    lt = text_tokens.shape[1]
    x = jnp.concatenate(
        [image_tokens, text_tokens.astype(image_tokens.dtype)], axis=1
    )
    modality = jnp.concatenate(
        [
            jnp.full((b, li), IMAGE, jnp.int32),
            jnp.full((b, lt), TEXT, jnp.int32),
        ],
        axis=1,
    )
    valid = jnp.concatenate([jnp.ones((b, li), bool), text_valid], axis=1)
    counts = (li, lt)  # tokens per modality id, for the hard-router gather
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = constrain(x, ("act_batch", "act_seq", "act_embed"))
    stats = []
    n = self.num_scanned
    rngs = (
        jax.random.split(rng, self.cfg.depth)
        if rng is not None
        else [None] * self.cfg.depth
    )

    def run(block, x, r, rate=None):
      return block(
          x,
          valid=valid,
          modality=modality,
          counts=counts,
          rng=r,
          drop_path_rate=rate,
      )

    if self.cfg.remat:  # keep only block inputs; recompute the rest
      run = nnx.remat(run)
    if n:

      def layer(block, x, r, rate):
        return run(block, x, r, rate)[0]

      rates = jnp.asarray(self.rates[:n], jnp.float32)
      if rng is None:  # evaluation: no drop path, nothing to scan but weights
        layer_fn = nnx.scan(
            lambda b, x: layer(b, x, None, None),
            in_axes=(0, nnx.Carry),
            out_axes=nnx.Carry,
            transform_metadata=_LAYERS,
        )
        x = layer_fn(self.scanned, x)
      else:
        layer_fn = nnx.scan(
            layer,
            in_axes=(0, nnx.Carry, 0, 0),
            out_axes=nnx.Carry,
            transform_metadata=_LAYERS,
        )
        x = layer_fn(self.scanned, x, rngs[:n], rates)
    for block, r in zip(self.blocks, rngs[n:]):
      x, s = run(block, x, r)
      if s is not None:
        stats.append(s)
    return (self.norm(x) if final_norm else x), stats


def scan_layout(tree: dict, cfg: ModelConfig) -> dict:
  """An unrolled backbone's nested dict -> the `scan_layers` layout.

  `tree` is `nnx.to_pure_dict` of an `EVE` built without scan_layers (or any
  dict shaped like it, e.g. optimizer moments): {"blocks": {0: ..., ...},
  ...}. Blocks 0..n-1 (n = `num_scanned(cfg)` of the scanned config) are
  stacked along a new leading axis under "scanned"; the rest are renumbered
  from 0 under "blocks". Everything else is passed through.
  """
  n = num_scanned(dataclasses.replace(cfg, scan_layers=True))
  out = {k: v for k, v in tree.items() if k != "blocks"}
  blocks = tree["blocks"]
  out["scanned"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(n)]
  )
  out["blocks"] = {i - n: blocks[i] for i in range(n, cfg.depth)}
  return out


def unscan_layout(tree: dict, cfg: ModelConfig) -> dict:
  """The inverse of `scan_layout`."""
  n = num_scanned(dataclasses.replace(cfg, scan_layers=True))
  out = {k: v for k, v in tree.items() if k not in ("blocks", "scanned")}
  blocks = {
      i: jax.tree.map(lambda x, i=i: x[i], tree["scanned"]) for i in range(n)
  }
  blocks.update({i + n: b for i, b in tree["blocks"].items()})
  out["blocks"] = blocks
  return out
