"""The pretraining model's forward passes, and the MoE numbers of a pass.

Each pass runs EVE (eve_jax/model/eve.py) with the pretraining heads
(eve_jax/model/heads.py) on one arrangement of the inputs; the losses that
train them are the tasks' (eve_jax/tasks/pretrain.py, retrieval.py), and
inference, pictures and predictions run them as they are.

  mlm_pass  full image + masked text -> word logits
  mim_pass  visible patches + full text -> pixels of every patch
  joint_pass visible patches + masked text -> word logits and pixels (the
            paper's Table 5 row that masks both modalities at once)
  itc_pass  image-only and text-only passes -> similarities
  itm_pass  the pair and two hard negatives, fused -> match logits

Legend: B batch, N patches, L text length, V vocabulary, Q = P*P*3 pixel
values per patch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.moe import MoEStats


def sum_moe_stats(stats: list[MoEStats]) -> dict[str, jax.Array]:
  """One pass's soft-router stats: scalars summed over its layers, and per
  layer `expert_counts` [S, M, E] and `router_entropy` [S, M] (summed over
  tokens; eve_jax/viz/routing.py; unused outputs cost nothing under jit)."""
  zero = jnp.zeros((), jnp.float32)
  if stats:
    counts = jnp.stack([s.expert_counts for s in stats])
    entropy = jnp.stack([s.router_entropy for s in stats])
  else:
    counts = jnp.zeros((0, 2, 0), jnp.float32)
    entropy = jnp.zeros((0, 2), jnp.float32)
  return dict(
      aux_loss=sum((s.aux_loss for s in stats), zero),
      dropped=sum((s.dropped for s in stats), zero),
      routed=sum((s.routed for s in stats), zero),
      expert_counts=counts,
      router_entropy=entropy,
  )


def visible_tokens(img: jax.Array, keep_idx: jax.Array) -> jax.Array:
  """[B, 1+N, D] embedded image (CLS first), [B, K] int32 kept patch indices
  -> [B, 1+K, D]: the CLS token and the kept patches, in `keep_idx` order."""
  patches = jnp.take_along_axis(img[:, 1:], keep_idx[..., None], axis=1)
  return jnp.concatenate([img[:, :1], patches], axis=1)


def mlm_pass(
    model: EVEPretrainModel,
    images: jax.Array,
    text_in: jax.Array,
    text_valid: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Full image + masked text -> [B, L, V] float32 logits, MoE stats."""
  bb = model.backbone
  img = bb.embed_image(images)
  txt = bb.embed_text(text_in)
  states, stats = bb.encode(img, txt, text_valid, rng=rng)
  with jax.named_scope("mlm_head"):
    logits = model.mlm_head(states[:, img.shape[1] :])
  return logits, sum_moe_stats(stats)


def mim_pass(
    model: EVEPretrainModel,
    images: jax.Array,
    text: jax.Array,
    text_valid: jax.Array,
    keep_idx: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Visible patches + full text -> [B, N, Q] float32 pixels, MoE stats."""
  bb = model.backbone
  vis = visible_tokens(bb.embed_image(images), keep_idx)
  txt = bb.embed_text(text)
  states, stats = bb.encode(vis, txt, text_valid, rng=rng)
  with jax.named_scope("mim_decoder"):
    pred = model.mim_decoder(states[:, : vis.shape[1]], keep_idx)
  return pred, sum_moe_stats(stats)


def joint_pass(
    model: EVEPretrainModel,
    images: jax.Array,
    text_in: jax.Array,
    text_valid: jax.Array,
    keep_idx: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Visible patches + masked text in one pass -> ([B, L, V] float32 word
  logits, [B, N, Q] float32 pixels, MoE stats)."""
  bb = model.backbone
  vis = visible_tokens(bb.embed_image(images), keep_idx)
  states, stats = bb.encode(vis, bb.embed_text(text_in), text_valid, rng=rng)
  with jax.named_scope("mlm_head"):
    logits = model.mlm_head(states[:, vis.shape[1] :])
  with jax.named_scope("mim_decoder"):
    pred = model.mim_decoder(states[:, : vis.shape[1]], keep_idx)
  return logits, pred, sum_moe_stats(stats)


def itc_pass(
    model: EVEPretrainModel,
    images: jax.Array,
    text: jax.Array,
    text_valid: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Image-only and text-only passes -> [B, B] float32 similarities / temp
  (rows images, columns texts), MoE stats of both passes."""
  bb = model.backbone
  r_img, r_txt = jax.random.split(rng) if rng is not None else (None, None)
  img = bb.embed_image(images)
  txt = bb.embed_text(text)
  img_states, s_img = bb.encode(img, txt[:, :0], text_valid[:, :0], rng=r_img)
  txt_states, s_txt = bb.encode(img[:, :0], txt, text_valid, rng=r_txt)
  with jax.named_scope("itc_head"):
    sims = model.matching.similarities(img_states[:, 0], txt_states[:, 0])
  return sims, sum_moe_stats(s_img + s_txt)


def hard_negatives(
    rng: jax.Array, sims: jax.Array, positive: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """For each text an image, and for each image a text, that it is not paired
  with, drawn with probability softmax(similarity) (ALBEF's hard negatives).

  Args:
    sims: [B, B] image-text similarities.
    positive: [B, B] bool, the pairs that match (default the diagonal;
      retrieval adds the other captions of the same image).

  Returns:
    (neg_image [B] int32: an image index per text,
     neg_text [B] int32: a text index per image).
  """
  sims = jax.lax.stop_gradient(sims.astype(jnp.float32))
  if positive is None:
    positive = jnp.eye(sims.shape[0], dtype=bool)
  off_diag = ~positive
  r_img, r_txt = jax.random.split(rng)
  neg_min = jnp.finfo(jnp.float32).min
  neg_image = jax.random.categorical(
      r_img, jnp.where(off_diag, sims.T, neg_min), axis=-1
  )
  neg_text = jax.random.categorical(
      r_txt, jnp.where(off_diag, sims, neg_min), axis=-1
  )
  return neg_image.astype(jnp.int32), neg_text.astype(jnp.int32)


def itm_pass(
    model: EVEPretrainModel,
    images: jax.Array,
    text: jax.Array,
    text_valid: jax.Array,
    sims: jax.Array,
    neg_rng: jax.Array,
    rng: jax.Array | None,
    positive: jax.Array | None = None,
):
  """The pair, a hard-negative image and a hard-negative text through the
  fused encoder -> ([3B, 2] logits, [3B] labels (1 = match), MoE stats).
  `positive` as in `hard_negatives`."""
  neg_image, neg_text = hard_negatives(neg_rng, sims, positive)
  b = images.shape[0]
  all_images = jnp.concatenate([images, images[neg_image], images])
  all_text = jnp.concatenate([text, text, text[neg_text]])
  all_valid = jnp.concatenate([text_valid, text_valid, text_valid[neg_text]])
  bb = model.backbone
  img = bb.embed_image(all_images)
  states, stats = bb.encode(img, bb.embed_text(all_text), all_valid, rng=rng)
  with jax.named_scope("itm_head"):
    logits = model.matching.match_logits(states[:, img.shape[1]])
  labels = jnp.concatenate(
      [jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)]
  )
  return logits, labels, sum_moe_stats(stats)


def moe_metrics(*passes: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The MoE numbers of a training step, from each pass's `sum_moe_stats`:
  aux_loss (summed; already times its weight, the task adds it to its
  loss), dropped_token_frac (assignments over capacity, of all the
  step's passes) and moe_assignments (the assignments routed: what
  gradient accumulation weighs dropped_token_frac by, eve_jax/accum.py)."""
  aux = sum(s["aux_loss"] for s in passes)
  routed = sum(s["routed"] for s in passes)
  dropped = sum(s["dropped"] for s in passes)
  return dict(
      aux_loss=aux,
      dropped_token_frac=dropped / jnp.maximum(routed, 1.0),
      moe_assignments=routed,
  )
