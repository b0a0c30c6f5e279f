"""Losses more than one task uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def contrastive_loss(sims: jax.Array) -> jax.Array:
  """Symmetric cross-entropy of a [B, B] similarity matrix whose diagonal
  holds the true pairs: (image->text + text->image) / 2."""
  labels = jnp.arange(sims.shape[0])
  return (cross_entropy(sims, labels) + cross_entropy(sims.T, labels)) / 2


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of [B, C] float32 logits against [B] int labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over the True entries of mask (0 when there are none)."""
  m = mask.astype(jnp.float32)
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)
