"""What every pretraining evaluation draws (train.viz): DIR/viz/
recon_{step}.png (MIM reconstructions of the first held-out images) and
routing_layer{i}_{step}.png per soft-router layer (Figure 6), the same
pictures in TensorBoard (images recon, routing/layer{i}).

The reconstruction is one small jitted MIM pass over the first evaluation
batch, on every process (the arrays are global); only process 0 writes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx

from eve_jax.viz import images as vimg
from eve_jax.viz import reconstruct, routing


class EvalPictures:
  """Call with (step, params, eval numbers) after each evaluation.

  Args:
    workdir: the run directory (pictures go to workdir/viz).
    graphdef, task, model_cfg: the pretraining program's.
    params_sharding, batch_sharding: where params / eval batches live.
    first_batch: () -> the first global evaluation batch (or None).
    rng: the key the evaluation draws batch 0's masks from.
    writer: the run's MetricWriter (TensorBoard images).
    num_images: rows of the reconstruction grid.
    is_main: whether this process writes.
  """

  def __init__(
      self,
      workdir: str,
      *,
      graphdef,
      task,
      model_cfg,
      params_sharding,
      batch_sharding,
      first_batch: Callable[[], Any],
      rng: jax.Array,
      writer,
      num_images: int = 4,
      is_main: bool = True,
  ):
    self.dir = os.path.join(workdir, "viz")
    self.task, self.model_cfg = task, model_cfg
    self.first_batch, self.rng = first_batch, rng
    self.writer, self.is_main = writer, is_main
    self.num_images = num_images
    replicated = jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec()
    )

    def recon(params, batch, rng):
      model = nnx.merge(graphdef, params)
      out = reconstruct.predict(model, task, batch, rng, num_images)
      out["example_valid"] = batch["example_valid"][:num_images]
      return out

    self._recon = jax.jit(
        recon,
        in_shardings=(params_sharding, batch_sharding, replicated),
        out_shardings=replicated,
    )

  def __call__(
      self, step: int, params, eval_numbers: dict[str, Any]
  ) -> list[str]:
    """Draws and writes; returns the paths written (process 0)."""
    written = []
    batch = self.first_batch()
    if batch is not None and "mim" in self.task.objectives:
      out = jax.device_get(self._recon(params, batch, self.rng))
      keep = np.asarray(out.pop("example_valid"), bool)  # not padding rows
      out = {k: np.asarray(v)[keep] for k, v in out.items()}
      pic = reconstruct.figure(
          out,
          self.model_cfg.patch_size,
          self.task.masking.norm_pix_loss,
          title=f"MIM at step {step}: "
          f"{self.task.masking.image_mask_ratio:.0%} of patches masked",
      )
      written.append(self._write(f"recon_{step}.png", "recon", pic, step))
    for layer, fracs in routing.from_metrics(eval_numbers).items():
      pic = routing.chart(fracs, layer, step)
      written.append(
          self._write(
              f"routing_layer{layer}_{step}.png",
              f"routing/layer{layer}",
              pic,
              step,
          )
      )
    return [p for p in written if p]

  def _write(self, name: str, tag: str, pic: np.ndarray, step: int):
    if not self.is_main:
      return None
    path = vimg.save_png(os.path.join(self.dir, name), pic)
    self.writer.image(step, tag, pic)
    return path


def first_of(
    batches: Callable[[], Iterator[Any]], to_global: Callable[[Any], Any]
) -> Callable[[], Any]:
  """() -> the first batch of a fresh `batches()`, on the mesh; None when
  there is none (corpora without an eval split)."""

  def get():
    batch = next(iter(batches()), None)
    return None if batch is None else to_global(batch)

  return get
