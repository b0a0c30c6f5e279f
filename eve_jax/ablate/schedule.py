"""The small ablation recipe: what one row pretrains and fine-tunes.

A row x seed is four runs of `python -m eve_jax.main`, each in its own
workdir (so each is resumable on its own): EVE-Shapes pretraining with
configs/base.py:tiny (4 blocks, 128 wide, soft routers in the top 2, 4
experts top-2), then the tiny EVE-Shapes VQA, NLVR2 and retrieval
fine-tunings from it (configs/{vqa,nlvr2,retrieval}.py:tiny), each for a
fixed number of steps and evaluated once at its end.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections

from eve_jax import config_lib
from eve_jax import flops
from eve_jax.ablate.tables import Row

FINETUNE_TASKS = ("vqa", "nlvr2", "retrieval")
STAGES = ("pretrain",) + FINETUNE_TASKS


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Steps per stage (batch 32 everywhere, the tiny configs' other keys)."""

  pretrain_steps: int
  finetune_steps: tuple[tuple[str, int], ...]
  eval_examples: int = 512  # pretraining's held-out evaluation

  def steps(self, stage: str) -> int:
    return (
        self.pretrain_steps
        if stage == "pretrain"
        else dict(self.finetune_steps)[stage]
    )


SCHEDULES = {
    # ~1 epoch of EVE-Shapes VQA (7,455 questions), 1/3 of NLVR2's 10 tiny
    # epochs, 1 of retrieval's 3; ABLATIONS.md gives the CPU time per row.
    "small": Schedule(
        pretrain_steps=800,
        finetune_steps=(("vqa", 240), ("nlvr2", 300), ("retrieval", 160)),
    ),
    # For tests: every stage runs and evaluates, nothing is learned.
    "smoke": Schedule(
        pretrain_steps=20,
        finetune_steps=(("vqa", 20), ("nlvr2", 20), ("retrieval", 20)),
        eval_examples=64,
    ),
}


def get_schedule(name: str) -> Schedule:
  if name not in SCHEDULES:
    raise ValueError(f"--schedule={name!r} is not one of {sorted(SCHEDULES)}")
  return SCHEDULES[name]


def _flag(key: str, value) -> str:
  return f"--config.{key}={value}"


def pretrain_config(row: Row) -> ml_collections.ConfigDict:
  """configs/base.py:tiny with the row's overrides (to size its FLOPs)."""
  c = config_lib.from_file("base", "tiny")
  for key, value in row.overrides:
    *path, name = key.split(".")
    target = c
    for part in path:
      target = target[part]
    target[name] = value
  return c


def flops_per_sample(row: Row) -> float:
  """Analytic training FLOPs per pretraining sample of the row's model and
  objectives (eve_jax/flops.py)."""
  from eve_jax import train  # pylint: disable=g-import-not-at-top

  c = pretrain_config(row)
  model_cfg = train.model_config(c, vocab_size=c.data.vocab_size)
  return flops.train_flops_per_sample(
      model_cfg,
      train.parse_objectives(c.objectives),
      c.masking.image_mask_ratio,
      batch_size=c.train.batch_size,
  )["total"]


def pretrain_steps(row: Row, schedule: Schedule, reference: Row | None) -> int:
  """The recipe's steps, or for a row trained at the same compute as
  `reference` the steps that match its FLOPs."""
  if reference is None:
    return schedule.pretrain_steps
  ratio = flops_per_sample(reference) / flops_per_sample(row)
  return max(1, round(schedule.pretrain_steps * ratio))


def command(
    stage: str,
    row: Row,
    seed: int,
    workdir: str,
    steps: int,
    schedule: Schedule,
    shapes_dir: str | None = None,
) -> list[str]:
  """The `python -m eve_jax.main` command line of one stage.

  `shapes_dir`: EVE-Shapes task files written once for every row of the
  seed (`write_shapes_tasks`); None lets each fine-tuning write its own.
  """
  base = [sys.executable, "-m", "eve_jax.main"]
  common = [
      f"--workdir={workdir}",
      _flag("seed", seed),
      _flag("train.steps", steps),
      _flag("train.checkpoint_every", steps),
      _flag("train.log_every", max(1, steps // 10)),
  ]
  if stage == "pretrain":
    cfg = os.path.join(config_lib.CONFIG_DIR, "base.py")
    return (
        base
        + [f"--config={cfg}:tiny"]
        + common
        + [
            _flag("train.eval_every", steps),
            _flag("train.eval_examples", schedule.eval_examples),
        ]
        + [_flag(k, v) for k, v in row.overrides]
    )
  cfg = os.path.join(config_lib.CONFIG_DIR, f"{stage}.py")
  pretrained = os.path.join(os.path.dirname(workdir), "pretrain")
  return (
      base
      + [f"--config={cfg}:tiny", _flag("init_from", pretrained)]
      + common
      + [_flag("train.eval_every", 0)]
      + (
          [_flag("data.dir", os.path.join(shapes_dir, stage))]
          if shapes_dir
          else []
      )
      + [_flag(k, v) for k, v in row.overrides if k.startswith("model.")]
  )


def write_shapes_tasks(root: str, seed: int) -> str:
  """The EVE-Shapes VQA / NLVR2 / retrieval files a tiny fine-tuning with
  `seed` writes for itself (eve_jax/finetune.py), once under root for
  every row: root/seed<s>/{vqa,nlvr2,retrieval}."""
  from eve_jax.data import shapes_tasks  # pylint: disable=g-import-not-at-top

  out = os.path.join(root, f"seed{seed}")
  done = os.path.join(out, "written")
  if not os.path.exists(done):
    image_size = config_lib.from_file("vqa", "tiny").model.image_size
    shapes_tasks.write_all(out, image_size=image_size, seed=seed)
    with open(done, "w") as f:
      f.write("ok\n")
  return out
