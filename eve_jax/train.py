"""The pretraining loop: restore, step, log, evaluate, checkpoint.

shapes -> jitted init -> ahead-of-time compiled step with donation -> loop.
The step is plain JAX over the model's parameter State: `nnx.merge` happens
inside the traced function, so nothing stateful crosses the jit boundary.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from eve_jax.checkpoint import Checkpointer
from eve_jax.data import pipeline as data_pipeline
from eve_jax.data import shapes
from eve_jax.data.tokenizer import Tokenizer, shapes_tokenizer
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.params_count import count_params
from eve_jax.model.variants import ModelConfig
from eve_jax.optim import make_optimizer
from eve_jax.tasks.pretrain import (MaskingConfig, PretrainTask, eval_metrics,
                                    eval_sums)
from eve_jax.writers import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's nnx.Param variables
  opt_state: Any


class DataError(ValueError):
  """The configured data cannot be read; the message says what to do."""


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str
                    ) -> Tokenizer:
  """The run's tokenizer, saved in DIR/tokenizer.model (trained once)."""
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return Tokenizer(path)
  if config.data.tokenizer:
    tok = Tokenizer(config.data.tokenizer)
    with open(config.data.tokenizer, "rb") as src, open(path, "wb") as dst:
      dst.write(src.read())
    return tok
  if config.data.name == "shapes":
    return shapes_tokenizer(path, vocab_size=config.data.vocab_size,
                            num_captions=config.data.num_tokenizer_captions,
                            seed=config.seed)
  raise DataError(f"config.data.tokenizer is empty and data {config.data.name!r} "
                  "has no built-in tokenizer")


def check_data(config: ml_collections.ConfigDict) -> None:
  """Fails fast, in one line, when the configured data cannot be read."""
  if config.data.name == "shapes":
    return
  if config.data.name == "corpora":
    raise DataError(
        "this config pretrains on COCO + Visual Genome + SBU + CC3M "
        "(+ CC12M for large) image-text pairs, and reading those corpora is "
        "not supported yet; run the CPU-sized model on the built-in "
        "EVE-Shapes data instead: --config=configs/base.py:tiny")
  raise DataError(f"config.data.name={config.data.name!r} is not one of "
                  "'shapes', 'corpora'")


def _shapes_dataset(config, tokenizer, model_cfg: ModelConfig, **kw):
  """EVE-Shapes batches at the model's image size and text length."""
  return data_pipeline.make_shapes_dataset(
      seed=config.seed, image_size=model_cfg.image_size, tokenizer=tokenizer,
      max_text_len=model_cfg.max_text_len, **kw)


def make_train_data(config, tokenizer, model_cfg: ModelConfig):
  return _shapes_dataset(
      config, tokenizer, model_cfg, split="train",
      batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def eval_batches(config, tokenizer, model_cfg: ModelConfig
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The held-out set, every batch padded to eval_batch_size with
  `example_valid` False on the padding rows (one compiled shape)."""
  bs = config.train.eval_batch_size
  ds = _shapes_dataset(
      config, tokenizer, model_cfg, split="eval", batch_size=bs,
      num_examples=config.train.eval_examples, shuffle=False, repeat=False,
      drop_remainder=False)
  for batch in ds:
    n = batch["text"].shape[0]
    batch = {k: v for k, v in batch.items() if k in ("image", "text",
                                                     "text_valid")}
    batch["example_valid"] = np.ones((n,), bool)
    if n < bs:
      batch = {k: np.concatenate([v, np.zeros((bs - n,) + v.shape[1:],
                                              v.dtype)]) for k, v in batch.items()}
    yield batch


def train_step(state: TrainState, batch, *, graphdef, task: PretrainTask,
               tx: optax.GradientTransformation, schedule, base_rng):
  """One optimizer step. Per-step randomness = fold_in(base_rng, step)."""
  rng = jax.random.fold_in(base_rng, state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    return task.loss(model, batch, rng, train=True)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = schedule(state.step)
  return TrainState(step=state.step + 1, params=params,
                    opt_state=opt_state), metrics


def evaluate(eval_step, params, config, tokenizer, model_cfg) -> dict:
  """Sums `eval_sums` over the whole held-out set, same masks every time."""
  rng = jax.random.key(config.seed + 1)
  total = None
  for i, batch in enumerate(eval_batches(config, tokenizer, model_cfg)):
    sums = eval_step(params, batch, jax.random.fold_in(rng, i))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return eval_metrics(jax.device_get(total))


def _write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured pretraining run in `workdir`.

  Returns the last evaluation's metrics.
  """
  check_data(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tokenizer = build_tokenizer(config, workdir)
  model_cfg = ModelConfig.from_config(config.model,
                                      vocab_size=tokenizer.vocab_size)
  if is_main:
    _write_config(config, workdir)

  task = PretrainTask(
      masking=MaskingConfig(**config.masking), mask_id=tokenizer.mask_id,
      cls_id=tokenizer.cls_id, vocab_size=tokenizer.vocab_size,
      num_special=max(tokenizer.special_ids) + 1)
  total_steps = config.train.steps
  tx, schedule = make_optimizer(config.optim, total_steps)

  def init(rng):
    model = EVEPretrainModel(model_cfg, rngs=nnx.Rngs(params=rng))
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: EVEPretrainModel(model_cfg, rngs=nnx.Rngs(params=0))))
  init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
  abstract = jax.eval_shape(init, init_rng)
  counts = count_params(abstract.params, model_cfg)
  logging.info("model %s: %s", model_cfg.variant,
               ", ".join(f"{k} {v:,}" for k, v in counts.items()))

  ckpt = Checkpointer(workdir, every=config.train.checkpoint_every,
                      keep=config.train.keep_checkpoints)
  train_iter = iter(make_train_data(config, tokenizer, model_cfg))
  start = ckpt.latest_step()
  if start is None:
    state = jax.jit(init)(init_rng)
    start = 0
  else:
    state, data_state = ckpt.restore(start, abstract)
    train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)

  step_fn = jax.jit(functools.partial(
      train_step, graphdef=graphdef, task=task, tx=tx, schedule=schedule,
      base_rng=base_rng), donate_argnums=(0,))
  eval_step = jax.jit(functools.partial(
      _eval_step, graphdef=graphdef, task=task,
      visual_ids=jnp.asarray(tokenizer.word_ids(shapes.VISUAL_WORDS)),
      blank=jnp.asarray(data_pipeline.normalize_image(
          shapes.blank_image(model_cfg.image_size)))))

  writer = MetricWriter(workdir, enabled=is_main)
  last_eval: dict[str, Any] = {}
  if start >= total_steps:
    logging.info("already at step %d of %d: nothing to train", start,
                 total_steps)
  else:
    batch = next(train_iter)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    logging.info("step compiled in %.1fs; XLA counts %.3g FLOPs per step "
                 "(%.3g per sample)", compile_s, flops,
                 flops / config.train.batch_size)
    writer.write(start, dict(compile_s=compile_s, xla_flops_per_step=flops,
                             **{f"params_{k}": v for k, v in counts.items()}),
                 file="run.jsonl")

    progress = Progress(total_steps, start, enabled=is_main)
    pending: list[dict[str, jax.Array]] = []
    t_log, n_log = time.perf_counter(), 0
    step = start
    while step < total_steps:
      if step > start:
        batch = next(train_iter)
      state, metrics = compiled(state, batch)
      step += 1
      pending.append(metrics)
      n_log += config.train.batch_size
      if step % config.train.log_every == 0 or step == total_steps:
        means = {k: float(np.mean([float(m[k]) for m in pending]))
                 for k in pending[0]}
        dt = time.perf_counter() - t_log
        means["samples_per_s"] = n_log / max(dt, 1e-9)
        means["lr"] = float(pending[-1]["lr"])
        writer.write(step, means)
        progress.update(step, means)
        pending, t_log, n_log = [], time.perf_counter(), 0
      if (config.train.eval_every and step % config.train.eval_every == 0
          ) or step == total_steps:
        t_eval = time.perf_counter()
        last_eval = evaluate(eval_step, state.params, config, tokenizer,
                             model_cfg)
        writer.write_eval(step, last_eval)
        progress.message(f"eval at step {step}: " + json.dumps(
            {k: round(v, 4) for k, v in last_eval.items()}))
        # Evaluation time is not training throughput.
        t_log += time.perf_counter() - t_eval
      if ckpt.should_save(step, total_steps):
        ckpt.save(step, state, train_iter.get_state())
    progress.close()
  ckpt.close()
  writer.close()
  return last_eval


def _eval_step(params, batch, rng, *, graphdef, task, visual_ids, blank):
  model = nnx.merge(graphdef, params)
  return eval_sums(task, model, batch, rng, visual_ids, blank)
