"""The trainer: runs any task (eve_jax/tasks/contract.py) from its config.

shapes -> shardings -> jitted init with out_shardings -> ahead-of-time
compiled step with donation -> loop (eve_jax/loop.py: log, evaluate,
checkpoint, stop on a signal, watchdog). The step is plain JAX over the
model's parameter State (eve_jax/program.py). The same code runs on one
device, a mesh of devices, or several processes (each feeds its own rows
of the global batch; process 0 writes metrics; all write checkpoints
together). Nothing here knows which task it runs: pretraining and every
fine-tuning task come through `registry.get(config.task)`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from eve_jax import loop, run_config, sharding, storage, versions
from eve_jax.checkpoint import Checkpointer
from eve_jax.data import specs
from eve_jax.program import StepProgram, TrainState, build_step, xla_flops
from eve_jax.tasks import registry
from eve_jax.tasks.contract import RunContext, Task
from eve_jax.writers import MetricWriter


@dataclasses.dataclass
class RunResult:
  """What `run` ends with: the last evaluation and the final train state
  (global arrays on the run's mesh)."""

  eval: dict[str, Any]
  state: TrainState


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
  """Trains (or resumes) `config.task` in `workdir`.

  Args:
    config: the whole config (configs/*.py).
    workdir: run directory; an existing one is resumed.
    mesh: the device mesh; default `sharding.make_mesh(config.mesh)` over
      all devices of all processes.
  """
  task_cls = registry.get(config.task)
  # A workdir that cannot be used (a file; a bucket that does not exist or
  # cannot be reached): one line, before any file or compile.
  storage.check_dir(workdir, "--workdir")
  task_cls.check(config, workdir)  # bad input: before any file
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding.parse_rules(config.axis_rules)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch(f"train.{name}", config.train[name], mesh, rules)
  logging.info(
      "mesh %s over %d devices, %d processes",
      dict(mesh.shape),
      mesh.size,
      jax.process_count(),
  )
  with sharding.use(mesh, rules):
    return _run(task_cls, config, workdir, mesh, rules)


def build_program(
    task: Task,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> StepProgram:
  """`task`'s training step on `mesh`, from shapes alone (no eager work,
  so also for compile-only devices; traced later, under `sharding.use`)."""
  m = task.model_cfg
  sharding.check_experts(m.num_experts, m.num_soft_layers, mesh, rules)
  tx, schedule = task.optimizer()
  return build_step(
      make_model=lambda key: task.build_model(nnx.Rngs(params=key)),
      task=task,
      tx=tx,
      schedule=schedule,
      seed=config.seed,
      mesh=mesh,
      rules=rules,
      batch_spec=task.batch_spec(config.train.batch_size),
      grad_accum_steps=config.train.get("grad_accum_steps", 1),
  )


def _run(task_cls, config, workdir: str, mesh, rules) -> RunResult:
  storage.makedirs(workdir)
  is_main = jax.process_index() == 0
  task = task_cls.setup(config, workdir, is_main)
  prog = build_program(task, config, mesh, rules)

  bs, eval_bs = config.train.batch_size, config.train.eval_batch_size
  eval_sh = sharding.batch_sharding(mesh, rules, eval_bs)
  shard = sharding.process_batch_slice(prog.batch_sharding, bs)
  eval_shard = sharding.process_batch_slice(eval_sh, eval_bs)
  spec = {k: (v.shape, v.dtype) for k, v in prog.batch.items()}

  def to_global(local):
    # Only the arrays the step was compiled for (the task's batch_spec),
    # in its dtypes.
    return sharding.global_batch(
        specs.select(local, spec), prog.batch_sharding, bs
    )

  ckpt = Checkpointer(
      workdir,
      every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints,
  )
  train_iter = task.train_batches(shard)
  # No writer yet: nothing in the workdir changes until the checkpoint is
  # restored (or the initial state made) and the config recorded.
  ctx = RunContext(
      config=config,
      workdir=workdir,
      is_main=is_main,
      mesh=mesh,
      rules=rules,
      program=prog,
      eval_sharding=eval_sh,
      eval_shard=eval_shard,
      writer=None,
  )
  start = ckpt.latest_step()
  changed = run_config.check(
      config, workdir, start, resolved=task.resolved_config()
  )
  if start is None:
    # Each device initializes only its own shards: no full copy anywhere.
    state = task.initial_state(prog.init(prog.init_rng), ctx)
    start = 0
  else:
    state, data_state = ckpt.restore(start, prog.abstract)
    train_iter.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  if is_main:  # after a successful restore
    run_config.write(config, workdir, start, changed)
  writer = MetricWriter(workdir, enabled=is_main)
  ctx = dataclasses.replace(ctx, writer=writer)

  last_eval: dict[str, Any] = {}
  if start >= task.steps:
    logging.info(
        "already at step %d of %d: nothing to train", start, task.steps
    )
  else:
    evaluate = task.evaluator(ctx)
    batch = to_global(next(train_iter))
    t0 = time.perf_counter()
    compiled = prog.lower(mesh, rules).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled) * mesh.size
    logging.info(
        "step compiled in %.1fs; XLA counts %.3g FLOPs per step "
        "(%.3g per sample)",
        compile_s,
        flops,
        flops / bs,
    )
    writer.write(
        start,
        dict(
            compile_s=compile_s,
            xla_flops_per_step=flops,
            mesh=dict(mesh.shape),
            versions=versions.stack(),
            **task.run_info(prog),
        ),
        file="run.jsonl",
    )
    state, last_eval = loop.run_steps(
        state,
        compiled,
        batch,
        (to_global(b) for b in train_iter),
        start=start,
        total_steps=task.steps,
        batch_size=bs,
        log_every=config.train.log_every,
        eval_every=config.train.eval_every,
        evaluate=evaluate,
        data_state=train_iter.get_state,
        writer=writer,
        ckpt=ckpt,
        is_main=is_main,
        log_extra=task.log_extra(train_iter),
        max_bad_steps=config.train.max_bad_steps,
        step_timeout_s=config.train.get("step_timeout_s", -1.0),
        workdir=workdir,
    )
  ckpt.close()
  writer.close()
  return RunResult(eval=last_eval, state=state)
