"""Pretraining (MLM + MIM, optionally ITC / ITM) as a task of the trainer.

`Pretraining` implements eve_jax/tasks/contract.py for `config.task =
"pretrain"`: the tokenizer and data the config chooses (eve_jax/data/
sources.py: EVE-Shapes or prepared corpora), the objectives' loss
(eve_jax/tasks/pretrain.py), AdamW with warmup + cosine, and an evaluation
on held-out data with the same masks every time (plus the routing numbers
of Figure 6 and, with `train.viz`, pictures). The loop itself is
eve_jax/trainer.py's (`trainer.run` with a pretraining config).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from eve_jax import flops as flops_lib
from eve_jax import accum, sharding, trainer
from eve_jax.data import corpora, run_tokenizer, shapes, sources, specs
from eve_jax.data import transforms
from eve_jax.data.tokenizer import Tokenizer
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.params_count import count_params
from eve_jax.model.variants import ModelConfig
from eve_jax.optim import make_optimizer
from eve_jax.program import StepProgram
from eve_jax.tasks.contract import RunContext
from eve_jax.tasks.pretrain import (
    MaskingConfig,
    PretrainTask,
    eval_metrics,
    eval_sums,
)
from eve_jax.viz import hook as viz_hook
from eve_jax.viz import routing


def parse_objectives(text: str) -> tuple[str, ...]:
  """ "mlm,mim" -> ("mlm", "mim") (validated by PretrainTask)."""
  return tuple(o.strip() for o in str(text).split(",") if o.strip())


def model_config(config, vocab_size: int) -> ModelConfig:
  """The pretraining model: config.model, the tokenizer's vocabulary, and
  the ITC/ITM heads when an objective needs them."""
  model_cfg = ModelConfig.from_config(config.model, vocab_size=vocab_size)
  if "itc" in parse_objectives(config.objectives):
    model_cfg = dataclasses.replace(model_cfg, matching_heads=True)
  return model_cfg


def eval_batch_rng(config, i: int) -> jax.Array:
  """The key evaluation batch i draws its masks from (every evaluation the
  same)."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), i)


class Pretraining:
  """The pretraining task (eve_jax/tasks/contract.py).

  Attributes:
    config: the run's config.
    tokenizer: the run's tokenizer (DIR/tokenizer.model).
    model_cfg: EVE with the pretraining heads.
    objective: the losses (eve_jax/tasks/pretrain.py: PretrainTask).
    steps: `train.steps`.
  """

  name = "pretrain"

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.model_cfg = model_config(config, tokenizer.vocab_size)
    self.steps = config.train.steps
    self.objective = PretrainTask(
        masking=MaskingConfig(**config.masking),
        mask_id=tokenizer.mask_id,
        cls_id=tokenizer.cls_id,
        vocab_size=tokenizer.vocab_size,
        num_special=max(tokenizer.special_ids) + 1,
        objectives=parse_objectives(config.objectives),
    )

  # -- building ------------------------------------------------------------

  @classmethod
  def check(cls, config, workdir: str) -> None:
    ModelConfig.from_config(config.model)  # a bad model key: before files
    if "itc" in parse_objectives(config.objectives):
      accum.refuse_batch_level(
          config.train.get("grad_accum_steps", 1), "objective itc"
      )
    sources.check_data(config, workdir)

  @classmethod
  def setup(cls, config, workdir: str, is_main: bool) -> Pretraining:
    del is_main  # the tokenizer is made by process 0, read by the others
    return cls(config, run_tokenizer.build_tokenizer(config, workdir))

  @classmethod
  def for_compile(cls, config, tokenizer, **sizes) -> Pretraining:
    del sizes
    return cls(config, tokenizer)

  @classmethod
  def inference_model(
      cls, model_cfg: ModelConfig, rngs: nnx.Rngs, **sizes
  ) -> EVEPretrainModel:
    del sizes
    return EVEPretrainModel(model_cfg, rngs=rngs)

  def build_model(self, rngs: nnx.Rngs) -> EVEPretrainModel:
    return EVEPretrainModel(self.model_cfg, rngs=rngs)

  def batch_spec(self, batch_size: int) -> specs.Spec:
    """One global pretraining batch (EVE-Shapes and corpora alike)."""
    return specs.pretrain(
        batch_size, self.model_cfg.image_size, self.model_cfg.max_text_len
    )

  def loss(self, model, batch, rng):
    return self.objective.loss(model, batch, rng)

  def loss_weights(self, batch):
    return self.objective.loss_weights(batch)

  def optimizer(self):
    return make_optimizer(self.config.optim, self.steps)

  def analytic_flops_per_sample(self, batch_size: int) -> float:
    return flops_lib.train_flops_per_sample(
        self.model_cfg,
        self.objective.objectives,
        self.config.masking.image_mask_ratio,
        batch_size=batch_size,
    )["total"]

  # -- running -------------------------------------------------------------

  def train_batches(self, shard: tuple[int, int]):
    return iter(
        sources.make_train_data(
            self.config, self.tokenizer, self.model_cfg, shard
        )
    )

  def initial_state(self, state, ctx: RunContext):
    del ctx  # pretraining starts from the random initialization
    return state

  def run_info(self, program: StepProgram) -> dict[str, Any]:
    counts = count_params(program.abstract.params, self.model_cfg)
    logging.info(
        "model %s: %s",
        self.model_cfg.variant,
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    return {f"params_{k}": v for k, v in counts.items()}

  def log_extra(self, train_batches):
    if isinstance(train_batches, corpora.CorpusIterator):
      # Images that did not decode, dropped so far (this process).
      return lambda: {"data_skipped": train_batches.skipped}
    return None

  def resolved_config(self) -> dict[str, Any]:
    return {}

  def eval_step(
      self, program: StepProgram, eval_sharding: jax.sharding.NamedSharding
  ):
    """jitted (params, batch, rng) -> replicated metric sums
    (`tasks.pretrain.eval_sums`)."""
    replicated = jax.sharding.NamedSharding(
        eval_sharding.mesh, jax.sharding.PartitionSpec()
    )
    # NumPy constants: no eager op on the mesh while building.
    if sources.uses_corpora(self.config):
      # No word list that only the image can tell; the "blank" image (the
      # text-only baseline) is mid-gray.
      visual_ids = np.zeros((0,), np.int32)
      blank = np.zeros((self.model_cfg.image_size,) * 2 + (3,), np.float32)
    else:
      visual_ids = np.asarray(
          self.tokenizer.word_ids(shapes.VISUAL_WORDS), np.int32
      )
      blank = transforms.normalize_image(
          shapes.blank_image(self.model_cfg.image_size)
      )
    return jax.jit(
        functools.partial(
            _eval_step,
            graphdef=program.graphdef,
            task=self.objective,
            visual_ids=visual_ids,
            blank=blank,
        ),
        in_shardings=(
            program.state_shardings.params,
            eval_sharding,
            replicated,
        ),
        out_shardings=replicated,
    )

  def evaluator(self, ctx: RunContext):
    config, model_cfg = self.config, self.model_cfg
    if config.train.eval_examples < ctx.eval_shard[1]:
      raise ValueError(
          f"train.eval_examples={config.train.eval_examples} "
          f"is fewer than the {ctx.eval_shard[1]} processes' "
          "data shards"
      )
    eval_step = self.eval_step(ctx.program, ctx.eval_sharding)
    to_global = functools.partial(
        sharding.global_batch,
        sharding=ctx.eval_sharding,
        batch_size=config.train.eval_batch_size,
    )
    pictures = None
    if config.train.get("viz", True):  # DIR/viz/ PNGs (eve_jax/viz/hook.py)
      pictures = viz_hook.EvalPictures(
          ctx.workdir,
          graphdef=ctx.program.graphdef,
          task=self.objective,
          model_cfg=model_cfg,
          params_sharding=ctx.program.state_shardings.params,
          batch_sharding=ctx.eval_sharding,
          first_batch=viz_hook.first_of(
              lambda: sources.eval_batches(
                  config, self.tokenizer, model_cfg, ctx.eval_shard
              ),
              to_global,
          ),
          rng=eval_batch_rng(config, 0),
          writer=ctx.writer,
          is_main=ctx.is_main,
      )

    def evaluate_and_draw(state):
      out = evaluate(
          eval_step,
          state.params,
          config,
          self.tokenizer,
          model_cfg,
          to_global,
          ctx.eval_shard,
      )
      if pictures is not None and out:
        pictures(int(state.step), state.params, out)
      return out

    return evaluate_and_draw


def evaluate(
    eval_step,
    params,
    config,
    tokenizer,
    model_cfg,
    to_global=lambda b: b,
    shard=(0, 1),
) -> dict:
  """Sums `eval_sums` over the whole held-out set, same masks every time."""
  total = None
  for i, batch in enumerate(
      sources.eval_batches(config, tokenizer, model_cfg, shard)
  ):
    sums = eval_step(params, to_global(batch), eval_batch_rng(config, i))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:  # corpora without an eval split (`prepare --eval_images`)
    return {}
  total = jax.device_get(total)
  # Figure 6's numbers: routing/layer{i}/{image,text}/expert{e}.
  return dict(
      eval_metrics(total),
      **routing.metrics(
          total["expert_counts"], model_cfg.top_k, list(model_cfg.moe_layers)
      ),
      **routing.health(
          total["expert_counts"],
          total["router_entropy"],
          model_cfg.top_k,
          list(model_cfg.moe_layers),
      ),
  )


@dataclasses.dataclass
class Program:
  """Everything compiled about a pretraining run, built before any array
  exists (and without eager work: it also builds for compile-only devices).

  Attributes:
    model_cfg, task: the model and its pretraining objectives.
    train: the training step (eve_jax/program.py: graphdef, abstract state
      and batch, shardings, init, step).
    eval_sharding: NamedSharding of an evaluation batch.
    eval_step: jitted (params, batch, rng) -> replicated metric sums.
  """

  model_cfg: ModelConfig
  task: PretrainTask
  train: StepProgram
  eval_sharding: jax.sharding.NamedSharding
  eval_step: Any

  # The training step's parts, by the names callers have used.
  graphdef = property(lambda self: self.train.graphdef)
  abstract = property(lambda self: self.train.abstract)
  state_shardings = property(lambda self: self.train.state_shardings)
  batch_sharding = property(lambda self: self.train.batch_sharding)
  init = property(lambda self: self.train.init)
  step = property(lambda self: self.train.step)
  init_rng = property(lambda self: self.train.init_rng)


def build_program(
    config, tokenizer: Tokenizer, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> Program:
  """The pretraining step and eval step the trainer builds, for callers
  that need them without a run (benchmarks, tests, the compile command)."""
  task = Pretraining(config, tokenizer)
  prog = trainer.build_program(task, config, mesh, rules)
  eval_sh = sharding.batch_sharding(mesh, rules, config.train.eval_batch_size)
  return Program(
      model_cfg=task.model_cfg,
      task=task.objective,
      train=prog,
      eval_sharding=eval_sh,
      eval_step=task.eval_step(prog, eval_sh),
  )


def _eval_step(params, batch, rng, *, graphdef, task, visual_ids, blank):
  model = nnx.merge(graphdef, params)
  return eval_sums(task, model, batch, rng, visual_ids, blank)
