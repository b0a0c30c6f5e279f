"""Pretraining heads: the two-layer MLM head and the MAE-style MIM decoder.

Legend: B batch, N patches, Nv visible patches, P patch size, D encoder
width, Dd decoder width, L text length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.block import Block
from eve_jax.model.eve import EVE
from eve_jax.model.layers import Dense, LayerNorm, activation_fn, param
from eve_jax.model.variants import ModelConfig


class MLMHead(nnx.Module):
  """[B, L, D] -> [B, L, V]: Linear(D, D) -> GELU -> LN -> Linear(D, V)."""

  def __init__(
      self, dim: int, vocab_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.dense = Dense(dim, dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.decoder = Dense(
        dim, vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm(activation_fn("gelu")(self.dense(x)))
    return self.decoder(x).astype(jnp.float32)  # the loss is in float32


class MIMDecoder(nnx.Module):
  """Visible image states + mask tokens -> pixels of every patch.

  A narrow Transformer (MAE): the encoder's visible image states are
  projected to Dd, mask tokens fill the masked slots, the decoder's own
  positions are added, and each patch's P*P*3 pixels are predicted.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    dd = cfg.decoder_width
    self.embed = Dense(
        cfg.width, dd, axes=("embed", "mlp"), dtype=dt, rngs=rngs
    )
    self.mask_token = param(
        rngs, jax.nn.initializers.normal(0.02), (dd,), ("embed",)
    )
    self.pos_embed = param(
        rngs,
        jax.nn.initializers.normal(0.02),
        (1 + cfg.num_patches, dd),
        (None, "embed"),
    )
    self.blocks = nnx.List(
        [
            Block(
                dd,
                cfg.decoder_heads,
                4 * dd,
                ffn="dense",
                layer_scale_init=None,
                drop_path_rate=0.0,
                activation=cfg.activation,
                attention=cfg.attention,
                dtype=dt,
                rngs=rngs,
            )
            for _ in range(cfg.decoder_depth)
        ]
    )
    self.norm = LayerNorm(dd, dtype=dt, rngs=rngs)
    self.pred = Dense(
        dd, cfg.patch_size**2 * 3, axes=("embed", None), dtype=dt, rngs=rngs
    )
    self.num_patches = cfg.num_patches

  def __call__(self, visible: jax.Array, keep_idx: jax.Array) -> jax.Array:
    """Args:
      visible: [B, 1 + Nv, D] encoder states of the image CLS + visible
        patches, in the order of `keep_idx`.
      keep_idx: [B, Nv] int32 patch index of each visible state.

    Returns:
      [B, N, P*P*3] float32 predicted pixels of every patch.
    """
    b = visible.shape[0]
    x = self.embed(visible)
    full = jnp.broadcast_to(
        self.mask_token[...].astype(x.dtype), (b, self.num_patches, x.shape[-1])
    )
    full = jax.vmap(lambda f, i, v: f.at[i].set(v))(full, keep_idx, x[:, 1:])
    x = jnp.concatenate([x[:, :1], full], axis=1)
    x = x + self.pos_embed[...].astype(x.dtype)
    valid = jnp.ones(x.shape[:2], bool)
    for block in self.blocks:
      x, _ = block(x, valid=valid)
    return self.pred(self.norm(x))[:, 1:].astype(jnp.float32)


class MatchingHeads(nnx.Module):
  """Image-text contrastive (ITC) and matching (ITM) heads.

  ITC: CLS states of the image-only and the text-only pass -> bias-free
  projections (D -> P) -> unit vectors; similarities over a learned
  temperature (init 0.07, kept in [0.001, 0.5]). ITM: Linear(D, 2) on the
  text CLS of a fused [image ; text] pass (match / no match).
  """

  def __init__(
      self, dim: int, proj_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.image_proj = Dense(
        dim,
        proj_dim,
        axes=("embed", "mlp"),
        use_bias=False,
        dtype=dtype,
        rngs=rngs,
    )
    self.text_proj = Dense(
        dim,
        proj_dim,
        axes=("embed", "mlp"),
        use_bias=False,
        dtype=dtype,
        rngs=rngs,
    )
    self.temp = param(rngs, jax.nn.initializers.constant(0.07), (), ())
    self.itm = Dense(dim, 2, axes=("embed", None), dtype=dtype, rngs=rngs)

  def similarities(
      self, image_cls: jax.Array, text_cls: jax.Array
  ) -> jax.Array:
    """[B, D] x2 -> [B_image, B_text] float32 cosine similarity / temp."""

    def unit(x):
      x = x.astype(jnp.float32)
      return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)

    img = unit(self.image_proj(image_cls))
    txt = unit(self.text_proj(text_cls))
    temp = jnp.clip(self.temp[...], 0.001, 0.5)
    return img @ txt.T / temp

  def match_logits(self, fused_text_cls: jax.Array) -> jax.Array:
    """[B, D] -> [B, 2] float32 (no match, match)."""
    return self.itm(fused_text_cls).astype(jnp.float32)


class EVEPretrainModel(nnx.Module):
  """The backbone plus the pretraining heads (MLM, MIM; ITC/ITM optional)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.backbone = EVE(cfg, rngs=rngs)
    self.mlm_head = MLMHead(cfg.width, cfg.vocab_size, dtype=dt, rngs=rngs)
    self.mim_decoder = MIMDecoder(cfg, rngs=rngs)
    self.matching = (
        MatchingHeads(cfg.width, cfg.width, dtype=dt, rngs=rngs)
        if cfg.matching_heads
        else None
    )
