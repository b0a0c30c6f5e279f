"""The trainer's own training step, built for a target's devices.

The task the config names (eve_jax/tasks/registry.py), made with
`for_compile`, and `trainer.build_program`: the same shapes, shardings,
donation and jitted step a run compiles at its start, here over compile-only devices and with
no data, tokenizer file or checkpoint on the machine. What the step's
program depends on is only shapes: the vocabulary size (a stand-in
tokenizer gives it) and, for VQA, the number of answers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from eve_jax import sharding
from eve_jax.model.variants import ModelConfig
from eve_jax.tasks import registry


class VocabOnly:
  """A tokenizer stand-in with a vocabulary size and special ids, which is
  all the compiled step reads of a tokenizer."""

  pad_id, unk_id, cls_id, mask_id = 0, 1, 2, 3

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size
    self.special_ids = frozenset((0, 1, 2, 3))

  def word_ids(self, words) -> np.ndarray:
    del words  # only the evaluation step reads them
    return np.zeros((0,), np.int32)


def vocab_size_of(config: ml_collections.ConfigDict) -> int:
  """The vocabulary the run's tokenizer would have: `data.vocab_size`
  (the size `prepare tokenizer` and EVE-Shapes train to) or the model's."""
  data = config.get("data", {})
  return int(data.get("vocab_size", 0) or config.model.vocab_size)


@dataclasses.dataclass
class Built:
  """A lowered (not yet compiled) training step and what it is of.

  Attributes:
    lowered: `jax.stages.Lowered` of the step.
    mesh: the mesh over the target's devices.
    model_cfg: the model as the step builds it.
    batch_size: the global batch.
    grad_accum_steps: microbatches it is run in (eve_jax/accum.py).
    flops_per_sample: analytic training FLOPs (eve_jax/flops.py).
    lower_s: seconds to trace and lower.
  """

  lowered: Any
  mesh: jax.sharding.Mesh
  model_cfg: ModelConfig
  batch_size: int
  flops_per_sample: float
  lower_s: float
  grad_accum_steps: int = 1


def lower_step(
    config: ml_collections.ConfigDict,
    devices,
    *,
    vocab_size: int | None = None,
    num_answers: int = 3129,
) -> Built:
  """Lowers `config`'s training step for `devices` (a mesh from
  config.mesh over them). Raises ValueError (one line) for a mesh, batch
  or expert count that does not divide."""
  from eve_jax import trainer  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.parse_rules(config.axis_rules)
  sharding.check_batch("train.batch_size", config.train.batch_size, mesh, rules)
  tokenizer = VocabOnly(vocab_size or vocab_size_of(config))
  t0 = time.perf_counter()
  task = registry.get(config.task).for_compile(
      config, tokenizer, num_answers=num_answers
  )
  step = trainer.build_program(task, config, mesh, rules)
  model_cfg = task.model_cfg
  flops = task.analytic_flops_per_sample(config.train.batch_size)
  lowered = step.lower(mesh, rules)
  return Built(
      lowered=lowered,
      mesh=mesh,
      model_cfg=model_cfg,
      batch_size=config.train.batch_size,
      flops_per_sample=flops,
      lower_s=time.perf_counter() - t0,
      grad_accum_steps=config.train.get("grad_accum_steps", 1),
  )
