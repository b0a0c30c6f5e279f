"""The fine-tuning loop for VQA, NLVR2 and retrieval (config.task).

Like `train` (pretraining): shapes -> shardings -> jitted init -> AOT
compiled step with donated state -> loop with logging, evaluation and orbax
checkpoints (train state + data iterator), resumable in the same workdir.
What differs:

  - the model and loss come from a task object (eve_jax/tasks/{vqa,nlvr2,
    retrieval}.py): `build_model`, `train_examples`, `encode_train`, `loss`,
    `evaluate`;
  - parameters start from `config.init_from` (a pretraining workdir or a
    converted checkpoint, `eve_jax.pretrained`), the report in
    DIR/init_report.json; `--config.init_from=''` starts from scratch;
  - AdamW with warmup over the first `optim.warmup_frac` of the steps and a
    cosine decay; everything outside `backbone` (the new heads) at
    `optim.head_lr_mult` x the learning rate;
  - `train.steps` = `train.epochs` x examples / batch unless set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from eve_jax import loop, pretrained, run_config, sharding
from eve_jax.checkpoint import Checkpointer
from eve_jax.data import finetune_data, specs
from eve_jax.data.run_tokenizer import build_tokenizer, copy_tokenizer
from eve_jax.data.errors import DataError
from eve_jax.data.tokenizer import Tokenizer, load_tokenizer, shapes_tokenizer
from eve_jax.model.variants import ModelConfig
from eve_jax.optim import decay_mask, make_schedule
from eve_jax.program import StepProgram, TrainState, build_step, xla_flops
from eve_jax.writers import MetricWriter


def tasks():
  """{config.task: its task class} for the fine-tuning tasks."""
  from eve_jax.tasks import nlvr2, retrieval, vqa  # pylint: disable=g-import-not-at-top
  return {"vqa": vqa.VQATask, "nlvr2": nlvr2.NLVR2Task,
          "retrieval": retrieval.RetrievalTask}


def _make_tokenizer(config, path: str) -> Tokenizer:
  """For `run_tokenizer.build_tokenizer`: DIR/tokenizer.model once made; else
  `data.tokenizer`, the init_from run's, or (EVE-Shapes tasks) the one tiny
  pretraining trains."""
  if os.path.exists(path):
    return load_tokenizer(path)
  source = config.data.tokenizer or (
      pretrained.tokenizer_path(config.init_from) if config.init_from
      else "")
  if source:
    return copy_tokenizer(source, path)
  if config.data.get("shapes", False):
    return shapes_tokenizer(path, vocab_size=64, num_captions=4000,
                            seed=config.seed)
  raise DataError("no tokenizer: set --config.init_from (a pretraining "
                  "workdir) or --config.data.tokenizer")


def make_optimizer(optim_cfg, total_steps: int):
  """AdamW (decoupled wd on matmul weights), warmup + cosine; the heads'
  learning rate `head_lr_mult` x the backbone's."""
  warmup = int(round(optim_cfg.warmup_frac * total_steps))
  schedule = make_schedule(optim_cfg.lr, warmup, total_steps,
                           optim_cfg.end_lr_frac)

  def adamw(scale):
    return optax.adamw(lambda s: scale * schedule(s), b1=optim_cfg.b1,
                       b2=optim_cfg.b2, eps=optim_cfg.eps,
                       weight_decay=optim_cfg.weight_decay, mask=decay_mask)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "backbone" if getattr(p[0], "key", None) == "backbone"
        else "head", params)

  parts = []
  if optim_cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(optax.multi_transform(
      {"backbone": adamw(1.0), "head": adamw(optim_cfg.head_lr_mult)},
      labels))
  return optax.chain(*parts), schedule


@dataclasses.dataclass
class RunResult:
  eval: dict[str, Any]
  state: TrainState


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh | None = None) -> RunResult:
  """Fine-tunes (or resumes) `config.task` in `workdir`."""
  task_classes = tasks()
  if config.task not in task_classes:
    raise ValueError(f"config.task={config.task!r} is not one of "
                     f"{sorted(task_classes)}")
  ModelConfig.from_config(config.model)  # a bad model key: before any file
  if config.init_from:
    pretrained.read_config(config.init_from)  # fail before anything else
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.parse_rules(config.axis_rules)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch(f"train.{name}", config.train[name], mesh, rules)
  with sharding.use(mesh, rules):
    return _run(config, workdir, mesh, rules, task_classes[config.task])


def _run(config, workdir, mesh, rules, task_cls) -> RunResult:
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if config.data.get("shapes", False) and not config.data.dir:
    _write_shapes_tasks(config, workdir, is_main)
  tokenizer = build_tokenizer(config, workdir, make=_make_tokenizer)
  model_cfg = ModelConfig.from_config(config.model,
                                      vocab_size=tokenizer.vocab_size)
  sharding.check_experts(model_cfg.num_experts, model_cfg.num_soft_layers,
                         mesh, rules)
  task = task_cls(config, tokenizer, model_cfg)
  bs = config.train.batch_size
  steps = train_steps(config, task.num_train)
  logging.info("%s: %d training examples, %d steps of %d", task.name,
               task.num_train, steps, bs)

  prog = build_program(config, task, steps, mesh, rules)
  graphdef, state_sh, batch_sh = (prog.graphdef, prog.state_shardings,
                                  prog.batch_sharding)
  eval_sh = sharding.batch_sharding(mesh, rules, config.train.eval_batch_size)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = {k: (v.shape, v.dtype) for k, v in prog.batch.items()}

  shard = sharding.process_batch_slice(batch_sh, bs)
  eval_shard = sharding.process_batch_slice(eval_sh,
                                            config.train.eval_batch_size)
  train_iter = finetune_data.train_batches(
      task.train_examples, task.encode_train, batch_size=bs // shard[1],
      seed=config.seed, process_index=shard[0], process_count=shard[1],
      num_threads=config.data.num_threads)
  ckpt = Checkpointer(workdir, every=config.train.checkpoint_every,
                      keep=config.train.keep_checkpoints)
  start = ckpt.latest_step()
  changed = run_config.check(config, workdir, start)
  if start is None:
    state = prog.init(prog.init_rng)
    if config.init_from:
      state = _load_pretrained(config, state, state_sh, model_cfg,
                                       workdir, is_main)
    start = 0
  else:
    state, data_state = ckpt.restore(start, prog.abstract)
    train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  if is_main:  # after a successful restore
    run_config.write(config, workdir, start, changed)

  eval_fns = {}

  def run_eval(examples, encode, fn, *, params):
    """fn(model, batch) -> [b, ...] per example, over all `examples`, with
    `params`: numpy [len(examples), ...] (every process gets all rows)."""
    if fn not in eval_fns:
      eval_fns[fn] = _eval_fn(fn, graphdef, state_sh.params, eval_sh,
                              replicated)
    compiled = eval_fns[fn]
    outs, rows = [], []
    for batch in finetune_data.eval_batches(
        examples, encode, global_batch=config.train.eval_batch_size,
        process_index=eval_shard[0], process_count=eval_shard[1],
        num_threads=config.data.num_threads):
      g = sharding.global_batch(batch, eval_sh, config.train.eval_batch_size)
      out, row = jax.device_get(compiled(params, g))
      outs.append(out)
      rows.append(row)
    out, row = np.concatenate(outs), np.concatenate(rows).astype(np.int64)
    # Padding rows (-1) sort last; every real row appears exactly once.
    order = np.argsort(np.where(row < 0, len(examples), row),
                       kind="stable")[:len(examples)]
    if not np.array_equal(row[order], np.arange(len(examples))):
      raise RuntimeError("evaluation lost or repeated examples")
    return out[order]

  writer = MetricWriter(workdir, enabled=is_main)
  last_eval: dict[str, Any] = {}
  def to_global(local):
    # The arrays the step was compiled for (the task's batch_spec).
    return sharding.global_batch(specs.select(local, spec), batch_sh, bs)

  if start < steps:
    batch = to_global(next(train_iter))
    t0 = time.perf_counter()
    compiled = prog.lower(mesh, rules).compile()
    compile_s = time.perf_counter() - t0
    writer.write(start, dict(compile_s=compile_s, mesh=dict(mesh.shape),
                             xla_flops_per_step=xla_flops(compiled)
                             * mesh.size, total_steps=steps),
                 file="run.jsonl")
    state, last_eval = loop.run_steps(
        state, compiled, batch, (to_global(b) for b in train_iter),
        start=start, total_steps=steps, batch_size=bs,
        log_every=config.train.log_every, eval_every=config.train.eval_every,
        evaluate=lambda s: task.evaluate(
            functools.partial(run_eval, params=s.params), workdir, is_main),
        data_state=train_iter.get_state, writer=writer, ckpt=ckpt,
        is_main=is_main, max_bad_steps=config.train.max_bad_steps,
        step_timeout_s=config.train.get("step_timeout_s", -1.0),
        workdir=workdir)
  else:
    logging.info("already at step %d of %d", start, steps)
  ckpt.close()
  writer.close()
  return RunResult(eval=last_eval, state=state)


def train_steps(config, num_train: int) -> int:
  """`train.steps`, else `train.epochs` x examples / batch."""
  return config.train.steps or math.ceil(
      config.train.epochs * num_train / config.train.batch_size)


def build_program(config, task, steps: int, mesh: jax.sharding.Mesh,
                  rules: sharding.Rules) -> StepProgram:
  """The task's training step on `mesh`, from shapes (no eager work, so
  also for compile-only devices; traced later, under `sharding.use`)."""
  tx, schedule = make_optimizer(config.optim, steps)
  return build_step(
      make_model=lambda key: task.build_model(nnx.Rngs(key)), task=task, tx=tx, schedule=schedule,
      seed=config.seed, mesh=mesh, rules=rules,
      batch_spec=task.batch_spec(config.train.batch_size))


def _write_shapes_tasks(config, workdir: str, is_main: bool) -> None:
  """EVE-Shapes versions of the tasks in the official formats, written
  once into DIR/shapes_tasks; `config.data.dir` pointed at this task's."""
  from eve_jax.data import shapes_tasks  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "shapes_tasks")
  done = os.path.join(root, "written")
  if is_main and not os.path.exists(done):
    logging.info("writing the EVE-Shapes downstream tasks to %s", root)
    shapes_tasks.write_all(root, image_size=config.model.image_size,
                           seed=config.seed)
    with open(done, "w") as f:
      f.write("ok\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("eve_jax shapes tasks written")
  config.data.dir = os.path.join(root, config.task)


def _eval_fn(fn, graphdef, params_sh, eval_sh, replicated):
  """jit of fn(model, batch) -> (outputs, rows), batch laid out on the mesh
  and the outputs gathered to every device."""
  def f(params, batch):
    model = nnx.merge(graphdef, params)
    return fn(model, batch), batch["row"]
  return jax.jit(f, in_shardings=(params_sh, eval_sh),
                 out_shardings=replicated)


def _load_pretrained(config, state, state_sh, model_cfg, workdir, is_main):
  """Replaces the matching parameters of a fresh state by the checkpoint's
  (each put straight into its sharding), writes DIR/init_report.json."""
  source, step = pretrained.load_params(config.init_from)
  src_model = pretrained.read_config(config.init_from).get("model", {})
  target = nnx.to_pure_dict(state.params)
  loaded, report = pretrained.match(target, source, src_model, model_cfg)
  shardings = nnx.to_pure_dict(state_sh.params)

  def put(path, leaf):
    key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    if key not in loaded:
      return leaf
    sh = shardings
    for k in key:
      sh = sh[k]
    return jax.device_put(loaded[key].astype(leaf.dtype), sh)

  params = jax.tree_util.tree_map_with_path(put, target)
  new_params = state.params
  nnx.replace_by_pure_dict(new_params, params)
  logging.info("init_from %s (step %d): %s", config.init_from, step,
               pretrained.summary(report))
  if is_main:
    with open(os.path.join(workdir, "init_report.json"), "w") as f:
      json.dump(dict(report, init_from=os.path.abspath(config.init_from),
                     step=int(step)), f, indent=1)
  # The optimizer moments start at zero either way; only params change.
  return state.replace(params=new_params)
