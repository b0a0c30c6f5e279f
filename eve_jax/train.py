"""The pretraining loop: restore, step, log, evaluate, checkpoint.

shapes -> shardings -> jitted init with out_shardings -> ahead-of-time
compiled step with donation -> loop. The step is plain JAX over the model's
parameter State: `nnx.merge` happens inside the traced function, so nothing
stateful crosses the jit boundary. The same code runs on one device, a mesh
of devices, or several processes (each feeds its own rows of the global
batch; process 0 writes metrics; all write checkpoints together).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from eve_jax import loop, run_config, sharding
from eve_jax.checkpoint import Checkpointer
from eve_jax.data import corpora, run_tokenizer, shapes, sources, specs
from eve_jax.data import transforms
from eve_jax.data.tokenizer import Tokenizer
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.params_count import count_params
from eve_jax.model.variants import ModelConfig
from eve_jax.optim import make_optimizer
from eve_jax.program import StepProgram, TrainState, build_step, xla_flops
from eve_jax.tasks.pretrain import (MaskingConfig, PretrainTask, eval_metrics,
                                    eval_sums)
from eve_jax.viz import hook as viz_hook
from eve_jax.viz import routing
from eve_jax.writers import MetricWriter


def eval_batch_rng(config, i: int) -> jax.Array:
  """The key evaluation batch i draws its masks from (every evaluation the
  same)."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), i)


def evaluate(eval_step, params, config, tokenizer, model_cfg,
             to_global=lambda b: b, shard=(0, 1)) -> dict:
  """Sums `eval_sums` over the whole held-out set, same masks every time."""
  total = None
  for i, batch in enumerate(sources.eval_batches(config, tokenizer, model_cfg,
                                         shard)):
    sums = eval_step(params, to_global(batch), eval_batch_rng(config, i))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:  # corpora without an eval split (`prepare --eval_images`)
    return {}
  total = jax.device_get(total)
  # Figure 6's numbers: routing/layer{i}/{image,text}/expert{e}.
  return dict(eval_metrics(total), **routing.metrics(
      total["expert_counts"], model_cfg.top_k,
      routing.soft_layers(model_cfg.depth, total["expert_counts"].shape[0])))


@dataclasses.dataclass
class RunResult:
  """What `run` ends with: the last evaluation and the final train state
  (global arrays on the run's mesh)."""
  eval: dict[str, Any]
  state: TrainState


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh | None = None) -> RunResult:
  """Trains (or resumes) the configured pretraining run in `workdir`.

  Args:
    config: the whole config (configs/base.py etc.).
    workdir: run directory; an existing one is resumed.
    mesh: the device mesh; default `sharding.make_mesh(config.mesh)` over
      all devices of all processes.
  """
  ModelConfig.from_config(config.model)  # a bad model key: before any file
  sources.check_data(config, workdir)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.parse_rules(config.axis_rules)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch(f"train.{name}", config.train[name], mesh, rules)
  logging.info("mesh %s over %d devices, %d processes",
               dict(mesh.shape), mesh.size, jax.process_count())
  with sharding.use(mesh, rules):
    return _run(config, workdir, mesh, rules)


def parse_objectives(text: str) -> tuple[str, ...]:
  """"mlm,mim" -> ("mlm", "mim") (validated by PretrainTask)."""
  return tuple(o.strip() for o in str(text).split(",") if o.strip())


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


def model_config(config, vocab_size: int) -> ModelConfig:
  """The pretraining model: config.model, the tokenizer's vocabulary, and
  the ITC/ITM heads when an objective needs them."""
  model_cfg = ModelConfig.from_config(config.model, vocab_size=vocab_size)
  if "itc" in parse_objectives(config.objectives):
    model_cfg = dataclasses.replace(model_cfg, matching_heads=True)
  return model_cfg


def batch_spec(config, model_cfg: ModelConfig, batch_size: int
               ) -> specs.Spec:
  """One global pretraining batch (EVE-Shapes and prepared corpora alike)."""
  return specs.pretrain(batch_size, model_cfg.image_size,
                        model_cfg.max_text_len)


def build_program(config, tokenizer: Tokenizer, mesh: jax.sharding.Mesh,
                  rules: sharding.Rules) -> Program:
  """Shapes -> shardings -> jitted init, step and eval step (traced later,
  under `sharding.use(mesh, rules)`)."""
  objectives = parse_objectives(config.objectives)
  model_cfg = model_config(config, tokenizer.vocab_size)
  sharding.check_experts(model_cfg.num_experts, model_cfg.num_soft_layers,
                         mesh, rules)
  task = PretrainTask(
      masking=MaskingConfig(**config.masking), mask_id=tokenizer.mask_id,
      cls_id=tokenizer.cls_id, vocab_size=tokenizer.vocab_size,
      num_special=max(tokenizer.special_ids) + 1, objectives=objectives)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  prog = build_step(
      make_model=lambda key: EVEPretrainModel(model_cfg,
                                              rngs=nnx.Rngs(params=key)),
      task=task, tx=tx, schedule=schedule, seed=config.seed, mesh=mesh,
      rules=rules,
      batch_spec=batch_spec(config, model_cfg, config.train.batch_size))
  eval_sh = sharding.batch_sharding(mesh, rules, config.train.eval_batch_size)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # NumPy constants: no eager op on the mesh while building.
  if sources.uses_corpora(config):
    # No word list that only the image can tell; the "blank" image (the
    # text-only baseline) is mid-gray.
    visual_ids = np.zeros((0,), np.int32)
    blank = np.zeros((model_cfg.image_size,) * 2 + (3,), np.float32)
  else:
    visual_ids = np.asarray(tokenizer.word_ids(shapes.VISUAL_WORDS), np.int32)
    blank = transforms.normalize_image(
        shapes.blank_image(model_cfg.image_size))
  eval_step = jax.jit(
      functools.partial(
          _eval_step, graphdef=prog.graphdef, task=task,
          visual_ids=visual_ids, blank=blank),
      in_shardings=(prog.state_shardings.params, eval_sh, replicated),
      out_shardings=replicated)
  return Program(model_cfg=model_cfg, task=task, train=prog,
                 eval_sharding=eval_sh, eval_step=eval_step)


def _run(config, workdir: str, mesh, rules) -> RunResult:
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tokenizer = run_tokenizer.build_tokenizer(config, workdir)
  prog = build_program(config, tokenizer, mesh, rules)
  model_cfg = prog.model_cfg
  total_steps = config.train.steps
  counts = count_params(prog.abstract.params, model_cfg)
  logging.info("model %s: %s", model_cfg.variant,
               ", ".join(f"{k} {v:,}" for k, v in counts.items()))

  bs, eval_bs = config.train.batch_size, config.train.eval_batch_size
  shard = sharding.process_batch_slice(prog.batch_sharding, bs)
  eval_shard = sharding.process_batch_slice(prog.eval_sharding, eval_bs)
  if config.train.eval_examples < eval_shard[1]:
    raise ValueError(f"train.eval_examples={config.train.eval_examples} is "
                     f"fewer than the {eval_shard[1]} processes' data shards")
  spec = prog.train.batch

  def to_global(local):
    # Only the arrays the step was compiled for (the spec of
    # eve_jax/data/specs.py), in its dtypes.
    local = specs.select(local, {k: (v.shape, v.dtype)
                                 for k, v in spec.items()})
    return sharding.global_batch(local, prog.batch_sharding, bs)

  to_global_eval = functools.partial(
      sharding.global_batch, sharding=prog.eval_sharding, batch_size=eval_bs)

  ckpt = Checkpointer(workdir, every=config.train.checkpoint_every,
                      keep=config.train.keep_checkpoints)
  train_iter = iter(sources.make_train_data(config, tokenizer, model_cfg,
                                            shard))
  start = ckpt.latest_step()
  changed = run_config.check(config, workdir, start)
  if start is None:
    # Each device initializes only its own shards: no full copy anywhere.
    state = prog.init(prog.init_rng)
    start = 0
  else:
    state, data_state = ckpt.restore(start, prog.abstract)
    train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  if is_main:  # after a successful restore
    run_config.write(config, workdir, start, changed)
  step_fn, eval_step = prog.step, prog.eval_step

  writer = MetricWriter(workdir, enabled=is_main)
  pictures = None
  if config.train.get("viz", True):  # DIR/viz/ PNGs (eve_jax/viz/hook.py)
    pictures = viz_hook.EvalPictures(
        workdir, graphdef=prog.graphdef, task=prog.task, model_cfg=model_cfg,
        params_sharding=prog.state_shardings.params,
        batch_sharding=prog.eval_sharding,
        first_batch=viz_hook.first_of(
            lambda: sources.eval_batches(config, tokenizer, model_cfg,
                                         eval_shard),
            to_global_eval),
        rng=eval_batch_rng(config, 0), writer=writer, is_main=is_main)

  def evaluate_and_draw(s):
    out = evaluate(eval_step, s.params, config, tokenizer, model_cfg,
                   to_global_eval, eval_shard)
    if pictures is not None and out:
      pictures(int(s.step), s.params, out)
    return out

  last_eval: dict[str, Any] = {}
  if start >= total_steps:
    logging.info("already at step %d of %d: nothing to train", start,
                 total_steps)
  else:
    batch = to_global(next(train_iter))
    t0 = time.perf_counter()
    compiled = step_fn.lower(prog.abstract, prog.train.batch).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled) * mesh.size
    logging.info("step compiled in %.1fs; XLA counts %.3g FLOPs per step "
                 "(%.3g per sample)", compile_s, flops, flops / bs)
    writer.write(start, dict(compile_s=compile_s, xla_flops_per_step=flops,
                             mesh=dict(mesh.shape),
                             **{f"params_{k}": v for k, v in counts.items()}),
                 file="run.jsonl")

    extra = None
    if isinstance(train_iter, corpora.CorpusIterator):
      # Images that did not decode, dropped so far (this process).
      extra = lambda: {"data_skipped": train_iter.skipped}  # noqa: E731
    state, last_eval = loop.run_steps(
        state, compiled, batch, (to_global(b) for b in train_iter),
        start=start, total_steps=total_steps, batch_size=bs,
        log_every=config.train.log_every, eval_every=config.train.eval_every,
        evaluate=evaluate_and_draw,
        data_state=train_iter.get_state, writer=writer, ckpt=ckpt,
        is_main=is_main, log_extra=extra,
        max_bad_steps=config.train.max_bad_steps,
        step_timeout_s=config.train.get("step_timeout_s", -1.0),
        workdir=workdir)
  ckpt.close()
  writer.close()
  return RunResult(eval=last_eval, state=state)


# The name other modules and tests have used.
_xla_flops = xla_flops


def _eval_step(params, batch, rng, *, graphdef, task, visual_ids, blank):
  model = nnx.merge(graphdef, params)
  return eval_sums(task, model, batch, rng, visual_ids, blank)
