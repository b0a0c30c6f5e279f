"""Grad-CAM style maps for EVE: which image patches (or words) a prediction
used (paper Figures 7-9).

EVE is one stream of [image ; text] tokens, so the "feature map" is the
hidden states h [B, L, D] entering one block, reached by wrapping that block
of a merged copy of the model (`_Tap`) inside the traced function: the model
code is untouched and its outputs are the same. For a scalar score s per
example (a masked word's log-probability, a VQA answer's logit, minus the
MIM loss) two relevance maps are computed per token j:

  "gradcam": relu( sum_d ds/dh_jd * h_jd ), gradient times activation at
      the input of the last block (the paper's maps are "from the last
      layer"; Grad-CAM with one "pixel" per token).
  "ig" (default): integrated gradients (Sundararajan et al. 2017) at the
      input of block 0 (embeddings after the pre-LayerNorm):
      relu( sum_d (h - h0)_jd * mean_a ds/dh_jd at h0 + a (h - h0) ),
      `steps` points a in (0, 1), h0 the same states for a baseline input
      (a blank image; words replaced by [MASK] for text relevance).

Why "ig" is the default: measured on tiny EVE-Shapes models, the last
block's gradient-times-activation does not single out the object a masked
color word names (hit rate at the level of picking a random object): by the
top layers the information has moved into other tokens (background patches,
the shape word), so the map lights up wherever it now sits. Attributing at
the embeddings, relative to an image without the objects, follows it back
to the pixels it came from (eve_jax/viz/localization.py measures both).

Image tokens' values form the g x g heat map (the image CLS left out); text
tokens' values are the per-word weights of Figure 8.

Legend: B batch, L = Li + Lt tokens, D width, N patches, g = sqrt(N).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eve_jax.model.passes import mim_pass, mlm_pass
from eve_jax.tasks.pretrain import patch_targets

METHODS = ("ig", "gradcam")
DEFAULT_LAYER = {"ig": 0, "gradcam": -1}


class _Box:
  """A plain holder (not a pytree, so nnx leaves it alone): the probe
  `delta` in, the tapped hidden states `h` out."""

  def __init__(self, delta):
    self.delta = delta
    self.h = None


class _Tap(nnx.Module):
  """Block wrapper: adds `box.delta` to the block's input and keeps the
  sum in `box.h`; with delta = 0, d score / d delta = d score / d h."""

  def __init__(self, inner, box: _Box):
    self.inner = inner
    self.box = box

  def __call__(self, x, **kw):
    x = x + self.box.delta.astype(x.dtype)
    self.box.h = x
    return self.inner(x, **kw)


def token_relevance(
    model,
    score: Callable[[Any, Any], jax.Array],
    inputs: Any,
    shape: tuple[int, int],
    *,
    method: str = "ig",
    layer: int | None = None,
    baseline: Any = None,
    steps: int = 8,
    relu: bool = True,
) -> np.ndarray:
  """Relevance of every token of the sequence a score runs through.

  Args:
    model: a model with `.backbone` (an unrolled `EVE`: `inference.load`).
    score: (model, inputs) -> [B] scores, each from its own example only.
    inputs: the arrays `score` reads (any pytree).
    shape: (B, L) of the sequence entering the tapped block.
    method: "ig" or "gradcam" (module docstring).
    layer: the block whose input is tapped (default 0 for "ig", the last
      for "gradcam"; negative counts from the top).
    baseline: inputs of the same shapes for "ig" (e.g. a blank image).
    steps: points on the integration path ("ig").
    relu: keep only what raises the score (False: the signed values; for
      "ig" they sum to score(inputs) - score(baseline)).

  Returns:
    float32 [B, L], >= 0 when relu.
  """
  if method not in METHODS:
    raise ValueError(f"method {method!r} is not one of {METHODS}")
  bb = model.backbone
  if bb.num_scanned:
    raise ValueError("Grad-CAM needs an unrolled model (inference.load)")
  depth = len(bb.blocks)
  layer = (DEFAULT_LAYER[method] if layer is None else layer) % depth
  graphdef, state = nnx.split(model)

  @jax.jit
  def grad_fn(state, delta, inputs):
    def f(delta):
      m = nnx.merge(graphdef, state)
      box = _Box(delta)
      m.backbone.blocks[layer] = _Tap(m.backbone.blocks[layer], box)
      # Examples are independent: the gradient of the sum is each one's.
      return score(m, inputs).sum(), box.h

    return jax.grad(f, has_aux=True)(delta)

  zero = jnp.zeros(tuple(shape) + (bb.cfg.width,), jnp.float32)
  grad, h = grad_fn(state, zero, inputs)
  clip = jax.nn.relu if relu else (lambda v: v)
  if method == "gradcam":
    return np.asarray(clip(jnp.sum(grad * h.astype(jnp.float32), -1)))
  if baseline is None:
    raise ValueError("method 'ig' needs a baseline input")
  _, h0 = grad_fn(state, zero, baseline)
  diff = (h - h0).astype(jnp.float32)
  total = jnp.zeros_like(diff)
  for a in (np.arange(steps) + 0.5) / steps:  # midpoint rule on [0, 1]
    # The tapped states become h0 + a (h - h0).
    g, _ = grad_fn(state, (a - 1.0) * diff, inputs)
    total = total + g
  return np.asarray(clip(jnp.sum(diff * total / steps, -1)))


def patch_grid(relevance: np.ndarray, num_patches: int) -> np.ndarray:
  """[B, L] token relevance -> [B, g, g] over the image patches (tokens
  1..N: the image CLS is token 0)."""
  g = int(round(num_patches**0.5))
  return relevance[:, 1 : 1 + num_patches].reshape(-1, g, g)


def mlm(
    model,
    images,
    text_in,
    valid,
    position: np.ndarray,
    target: np.ndarray | None = None,
    *,
    blank=None,
    method: str = "ig",
    layer: int | None = None,
    steps: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
  """Figure 7: for one [MASK] per example, the heat map over the image.

  The score is the log-probability of the explained word there (not its
  logit: evidence that raises every word's logit alike cancels).

  Args:
    model: a pretraining model (MLM head).
    images: [B, H, W, 3] normalized; text_in [B, Lt] with [MASK]s; valid.
    position: [B] the [MASK] whose prediction is explained.
    target: [B] the word explained (default the model's top prediction).
    blank: [H, W, 3] the baseline image for "ig" (default black).
    method, layer, steps: see `token_relevance`.

  Returns:
    (heat [B, g, g] >= 0, target [B] the explained word ids).
  """
  images = jnp.asarray(images)
  b = np.arange(len(position))
  if target is None:
    logits, _ = mlm_pass(model, images, text_in, valid, None)
    target = np.asarray(logits[b, position].argmax(-1))

  def score(m, imgs):
    logits, _ = mlm_pass(m, imgs, text_in, valid, None)
    return jax.nn.log_softmax(logits[b, position], -1)[b, target]

  base = _blank_like(images, blank)
  seq = 1 + model.cfg.num_patches + text_in.shape[1]
  rel = token_relevance(
      model,
      score,
      images,
      (len(b), seq),
      method=method,
      layer=layer,
      baseline=base,
      steps=steps,
  )
  return patch_grid(rel, model.cfg.num_patches), np.asarray(target)


def mim(
    model,
    images,
    text,
    valid,
    keep_idx,
    patch_mask,
    *,
    mask_id: int,
    norm_pix: bool = False,
    method: str = "ig",
    layer: int | None = None,
    steps: int = 8,
) -> np.ndarray:
  """Figure 8: for the masked patches of each image, the weight of each
  text token (score = minus the MIM loss on the masked patches; the "ig"
  baseline replaces every word by [MASK]).

  Returns:
    [B, Lt] >= 0 (0 at padding and at the text CLS, position 0).
  """
  mask = jnp.asarray(patch_mask, jnp.float32)
  images = jnp.asarray(images)
  target = patch_targets(images, model.cfg.patch_size, norm_pix)

  def score(m, txt):
    pred, _ = mim_pass(m, images, txt, valid, keep_idx, None)
    err = jnp.square(pred - target).mean(-1)
    return -(err * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)

  text = jnp.asarray(text)
  words = jnp.asarray(valid) & (jnp.arange(text.shape[1]) > 0)
  base = jnp.where(words, mask_id, text)
  li = 1 + keep_idx.shape[1]
  rel = token_relevance(
      model,
      score,
      text,
      (text.shape[0], li + text.shape[1]),
      method=method,
      layer=layer,
      baseline=base,
      steps=steps,
  )
  return rel[:, li:] * np.asarray(words)


def vqa(
    model,
    images,
    text,
    valid,
    answer: np.ndarray | None = None,
    *,
    blank=None,
    method: str = "ig",
    layer: int | None = None,
    steps: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
  """Figure 9: the heat map over the image for a VQA answer (default the
  top one); score = the answer's logit. Returns (heat [B, g, g], answer
  ids [B])."""
  images = jnp.asarray(images)
  b = np.arange(images.shape[0])
  if answer is None:
    logits, _ = model(images, text, valid)
    answer = np.asarray(logits.argmax(-1))

  def score(m, imgs):
    logits, _ = m(imgs, text, valid)
    return logits[b, answer]

  seq = 1 + model.cfg.num_patches + text.shape[1]
  rel = token_relevance(
      model,
      score,
      images,
      (len(b), seq),
      method=method,
      layer=layer,
      baseline=_blank_like(images, blank),
      steps=steps,
  )
  return patch_grid(rel, model.cfg.num_patches), np.asarray(answer)


def _blank_like(images: jax.Array, blank) -> jax.Array:
  """The baseline image batch: `blank` [H, W, 3] (default black, -1)."""
  if blank is None:
    return -jnp.ones_like(images)
  return jnp.broadcast_to(jnp.asarray(blank, images.dtype), images.shape)


def cell_coverage(mask: np.ndarray, g: int) -> np.ndarray:
  """[H, W] bool object mask -> [g, g] fraction of each patch cell it
  covers."""
  h, w = mask.shape
  return mask.reshape(g, h // g, g, w // g).mean((1, 3))
