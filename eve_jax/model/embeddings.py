"""Image and text embeddings, each with its own absolute positions.

Image: 16x16 patches (4x4 at tiny) -> linear projection (a conv with stride =
kernel, stored as [kh, kw, C, D] like a conv kernel so BEiT weights map
directly), a CLS token, learned positions for CLS + every patch.
Text: token embedding -> LayerNorm -> learned positions (up to 196).
The modality type embedding is added by the backbone, which owns the table.

Legend: B batch, H/W image height/width, P patch size, N patches, L text
length, D width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.layers import LayerNorm, param, trunc_normal


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, P, P, C], patches in row-major order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch, patch, c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """[B, N, P*P*C] -> [B, H, W, C] (inverse of `patchify` + flatten)."""
  b, n, _ = patches.shape
  g = int(round(n**0.5))
  x = patches.reshape(b, g, g, patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, g * patch, g * patch, channels
  )


class ImageEmbed(nnx.Module):
  """[B, H, W, 3] pixels -> [B, 1 + N, D] (CLS first, positions added)."""

  def __init__(
      self,
      image_size: int,
      patch: int,
      dim: int,
      *,
      positions: bool = True,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    n = (image_size // patch) ** 2
    self.patch = patch
    self.patch_kernel = param(
        rngs, trunc_normal, (patch, patch, 3, dim), (None, None, None, "embed")
    )
    self.patch_bias = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",))
    self.cls_token = param(rngs, trunc_normal, (dim,), ("embed",))
    # None: no absolute positions (a BEiT stack that used relative bias).
    self.pos_embed = (
        param(rngs, trunc_normal, (1 + n, dim), (None, "embed"))
        if positions
        else None
    )
    self.dtype = dtype

  def __call__(self, images: jax.Array) -> jax.Array:
    dt = self.dtype
    patches = patchify(images.astype(dt), self.patch)
    x = jnp.einsum(
        "bnijc,ijcd->bnd", patches, self.patch_kernel[...].astype(dt)
    )
    x = x + self.patch_bias[...].astype(dt)
    cls = jnp.broadcast_to(
        self.cls_token[...].astype(dt), (x.shape[0], 1, x.shape[-1])
    )
    x = jnp.concatenate([cls, x], axis=1)
    if self.pos_embed is None:
      return x
    # Positions are added here, before MIM keeps only the visible patches,
    # so every kept patch still knows where it was.
    return x + self.pos_embed[...].astype(dt)[: x.shape[1]]


class TextEmbed(nnx.Module):
  """[B, L] token ids -> [B, L, D]: LN(word embedding) + position."""

  def __init__(
      self,
      vocab_size: int,
      max_positions: int,
      dim: int,
      *,
      positions: bool = True,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.word_embed = param(
        rngs, trunc_normal, (vocab_size, dim), ("vocab", "embed")
    )
    self.norm = LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.pos_embed = (
        param(rngs, trunc_normal, (max_positions, dim), (None, "embed"))
        if positions
        else None
    )
    self.dtype = dtype

  def __call__(self, text: jax.Array) -> jax.Array:
    x = jnp.take(self.word_embed[...], text, axis=0)
    x = self.norm(x)
    if self.pos_embed is None:
      return x
    return x + self.pos_embed[...].astype(self.dtype)[: text.shape[1]]
