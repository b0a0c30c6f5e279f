"""The trainer's own training step, built for a target's devices.

Pretraining builds `train.build_program`, fine-tuning
`finetune.build_program`: the same shapes, shardings, donation and jitted
step a run compiles at its start, here over compile-only devices and with
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

from eve_jax import flops as flops_lib
from eve_jax import sharding
from eve_jax.model.variants import ModelConfig


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
    flops_per_sample: analytic training FLOPs (eve_jax/flops.py).
    lower_s: seconds to trace and lower.
  """
  lowered: Any
  mesh: jax.sharding.Mesh
  model_cfg: ModelConfig
  batch_size: int
  flops_per_sample: float
  lower_s: float


def lower_step(config: ml_collections.ConfigDict, devices,
               *, vocab_size: int | None = None, num_answers: int = 3129
               ) -> Built:
  """Lowers `config`'s training step for `devices` (a mesh from
  config.mesh over them). Raises ValueError (one line) for a mesh, batch
  or expert count that does not divide."""
  # pylint: disable=g-import-not-at-top
  from eve_jax import finetune, train
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.parse_rules(config.axis_rules)
  sharding.check_batch("train.batch_size", config.train.batch_size, mesh,
                       rules)
  tokenizer = VocabOnly(vocab_size or vocab_size_of(config))
  t0 = time.perf_counter()
  if config.task == "pretrain":
    prog = train.build_program(config, tokenizer, mesh, rules)
    model_cfg, step = prog.model_cfg, prog.train
    flops = flops_lib.train_flops_per_sample(
        model_cfg, train.parse_objectives(config.objectives),
        config.masking.image_mask_ratio,
        batch_size=config.train.batch_size)["total"]
  else:
    tasks = finetune.tasks()
    if config.task not in tasks:
      raise ValueError(f"config.task={config.task!r} is not one of "
                       f"{sorted(tasks)} or 'pretrain'")
    model_cfg = ModelConfig.from_config(config.model,
                                        vocab_size=tokenizer.vocab_size)
    sharding.check_experts(model_cfg.num_experts, model_cfg.num_soft_layers,
                           mesh, rules)
    task = tasks[config.task].without_data(config, tokenizer, model_cfg,
                                           num_answers=num_answers)
    step = finetune.build_program(config, task, max(config.train.steps, 1),
                                  mesh, rules)
    flops = flops_lib.finetune_flops_per_sample(
        model_cfg, config.task, config.train.batch_size)
  lowered = step.lower(mesh, rules)
  return Built(lowered=lowered, mesh=mesh, model_cfg=model_cfg,
               batch_size=config.train.batch_size, flops_per_sample=flops,
               lower_s=time.perf_counter() - t0)
