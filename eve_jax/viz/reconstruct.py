"""MIM reconstructions: original, masked input, reconstruction (MAE's
figure), for a few held-out images.

The reconstruction shows the visible patches as they are and the masked
ones as the decoder predicts them (only masked patches are trained). With
`norm_pix_loss` the decoder predicts per-patch normalized pixels: they are
shown with the true patch's mean and variance put back (as MAE's
visualization does), which borrows those two numbers from the original.

Legend: B images, N patches, P patch size, Q = P*P*3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eve_jax.model.embeddings import patchify, unpatchify
from eve_jax.model.passes import mim_pass
from eve_jax.viz import images as vimg

COLUMNS = ("original", "masked input", "reconstruction")


def predict(
    model, task, batch: dict[str, jax.Array], rng: jax.Array, num: int
) -> dict[str, jax.Array]:
  """The MIM pass on the first `num` rows with the masks `task.masks` draws
  for the whole batch from `rng` (the evaluation's masks for that batch).

  Returns:
    image [num, H, W, 3] normalized, pred [num, N, Q] float32 pixels,
    patch_mask [num, N] bool (True = masked).
  """
  r_mask, _ = jax.random.split(rng)  # as `eval_sums` and `PretrainTask.loss`
  _, _, keep_idx, patch_mask = task.masks(r_mask, batch, model.cfg.num_patches)
  images, text = batch["image"][:num], batch["text"][:num]
  pred, _ = mim_pass(
      model, images, text, batch["text_valid"][:num], keep_idx[:num], None
  )
  return dict(image=images, pred=pred, patch_mask=patch_mask[:num])


def panels(
    image: np.ndarray,
    pred: np.ndarray,
    patch_mask: np.ndarray,
    patch: int,
    norm_pix: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One row of the figure for one image.

  Args:
    image: [H, W, 3] normalized pixels.
    pred: [N, Q] predicted pixels (normalized per patch when norm_pix).
    patch_mask: [N] bool, True at masked patches.
    patch: P.

  Returns:
    (original, masked input with masked patches mid-gray, reconstruction),
    each uint8 [H, W, 3].
  """
  image = np.asarray(image, np.float32)
  target = np.asarray(patchify(jnp.asarray(image[None]), patch))[0]
  target = target.reshape(target.shape[0], -1)  # [N, Q]
  pred = np.asarray(pred, np.float32)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  m = np.asarray(patch_mask, bool)[:, None]
  masked = np.where(m, 0.0, target)  # 0 = mid-gray in [-1, 1]
  recon = np.where(m, pred, target)

  def pic(p):
    return vimg.to_uint8(np.asarray(unpatchify(jnp.asarray(p[None]), patch))[0])

  return vimg.to_uint8(image), pic(masked), pic(recon)


def figure(
    out: dict[str, np.ndarray],
    patch: int,
    norm_pix: bool = False,
    title: str = "",
    cell: int = 128,
) -> np.ndarray:
  """`predict`'s output (as numpy) -> the grid: one row per image,
  columns `COLUMNS`."""
  rows = [
      panels(
          out["image"][i], out["pred"][i], out["patch_mask"][i], patch, norm_pix
      )
      for i in range(len(out["image"]))
  ]
  return vimg.grid(rows, col_titles=COLUMNS, title=title, cell=cell)
