"""The compiled training step of any task, built from shapes alone.

shapes -> shardings -> jitted init (each device makes only its shards) ->
jitted step with the state donated. The trainer (`trainer.build_program`,
for every task) and `python -m eve_jax.compile` build their step here, so the program a compile report describes is the
one the trainer runs.

Nothing here runs an eager op: random keys are made inside the traced
functions from the integer seed, constants are NumPy. So the same builder
works for a mesh of compile-only devices (a TPU topology or a GPU target
description on a CPU machine, eve_jax/aot/), where an eager op fails.
Tracing and lowering happen later, under `sharding.use(mesh, rules)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from eve_jax import accum, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the model's nnx.Param variables
  opt_state: Any


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_rng, base_rng) of a run: the parameters' key and the one every
  step folds its step number into. Traceable (no eager work when called
  inside jit)."""
  init_rng, base_rng = jax.random.split(jax.random.key(seed))
  return init_rng, base_rng


def train_step(
    state: TrainState,
    batch,
    *,
    graphdef,
    task,
    tx: optax.GradientTransformation,
    schedule,
    seed: int,
    grad_accum_steps: int = 1,
):
  """One optimizer step of any task whose `loss(model, batch, rng)` returns
  (loss, metrics); pretraining and fine-tuning both step with it.
  Per-step randomness = fold_in(base_rng, step), base_rng from `run_keys`.
  With grad_accum_steps K > 1 the batch's gradient is summed over K
  microbatches (eve_jax/accum.py) before the one update."""
  rng = jax.random.fold_in(run_keys(seed)[1], state.step)

  def loss_fn(params, batch):
    return task.loss(nnx.merge(graphdef, params), batch, rng)

  if grad_accum_steps == 1:
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch
    )
  else:
    weights = getattr(task, "loss_weights", lambda b: {})(batch)
    (loss, metrics), grads = accum.loss_and_grads(
        loss_fn, state.params, batch, grad_accum_steps, weights
    )
  for name in accum.BY_COUNT.values():  # counts only accumulation needs
    metrics.pop(name, None)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite loss or gradient (a bad batch, an overflow) skips the
  # update: parameters and optimizer state stay as they were, so a NaN never
  # reaches a checkpoint. The step counter still advances with the data.
  # `loop.run_steps` counts these and stops after train.max_bad_steps in a
  # row.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(  # noqa: E731
      lambda n, o: jnp.where(finite, n, o), new, old
  )
  metrics = dict(
      metrics,
      loss=loss,
      grad_norm=grad_norm,
      lr=schedule(state.step),
      nonfinite=(~finite).astype(jnp.int32),
  )
  return (
      TrainState(
          step=state.step + 1,
          params=keep(params, state.params),
          opt_state=keep(opt_state, state.opt_state),
      ),
      metrics,
  )


@dataclasses.dataclass
class StepProgram:
  """A task's training step, built before any array exists.

  Attributes:
    graphdef: the model's graph (nnx.split's first half).
    abstract: the TrainState as ShapeDtypeStructs carrying their shardings
      (what orbax restores into and what the step is lowered with).
    state_shardings: the TrainState's NamedShardings.
    batch_sharding: the [B, ...] batch layout.
    batch: {name: ShapeDtypeStruct with batch_sharding}: the abstract batch
      the step is compiled for (from the data code's spec).
    init: jitted seed -> TrainState, out_shardings = state_shardings.
    step: jitted (state, batch) -> (state, replicated metrics), donated.
    seed: the run's seed (`run_keys`).
  """

  graphdef: Any
  abstract: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  batch: dict[str, jax.ShapeDtypeStruct]
  init: Any
  step: Any
  seed: int

  @property
  def init_rng(self) -> jax.Array:
    """The parameters' key (eager: only for runs on real devices)."""
    return run_keys(self.seed)[0]

  def lower(self, mesh: jax.sharding.Mesh, rules: sharding.Rules):
    """The step lowered for the abstract state and batch (no arrays)."""
    with sharding.use(mesh, rules):
      return self.step.lower(self.abstract, self.batch)


def build_step(
    *,
    make_model: Callable[[jax.Array], nnx.Module],
    task,
    tx: optax.GradientTransformation,
    schedule,
    seed: int,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    batch_spec: dict[str, tuple[tuple[int, ...], Any]],
    grad_accum_steps: int = 1,
) -> StepProgram:
  """The StepProgram of `task` on `mesh`.

  Args:
    make_model: key -> the task's model initialized from that key (called
      traced, never eagerly).
    task: has `loss(model, batch, rng) -> (loss, metrics)`.
    tx, schedule: the optimizer and its learning-rate schedule.
    seed: the run's seed.
    mesh, rules: where the state and batch live.
    batch_spec: {name: (shape, dtype)} of one global training batch, from
      the data code (eve_jax/data/specs.py); shape[0] is the batch size.
    grad_accum_steps: microbatches per step (eve_jax/accum.py), checked
      against the batch's data shards here.
  """

  def init(rng):
    params = nnx.state(make_model(rng), nnx.Param)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )

  key_spec = jax.eval_shape(lambda: run_keys(seed)[0])
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(run_keys(seed)[0])))
  abstract = jax.eval_shape(init, key_spec)
  state_sh = sharding.tree_shardings(abstract, mesh, rules)
  batch_size = next(iter(batch_spec.values()))[0][0]
  batch_sh = sharding.batch_sharding(mesh, rules, batch_size)
  accum.check(
      grad_accum_steps, batch_size, sharding.data_parallel_size(mesh, rules)
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
      functools.partial(
          train_step,
          graphdef=graphdef,
          task=task,
          tx=tx,
          schedule=schedule,
          seed=seed,
          grad_accum_steps=grad_accum_steps,
      ),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=(0,),
  )
  return StepProgram(
      graphdef=graphdef,
      abstract=sharding.with_shardings(abstract, state_sh),
      state_shardings=state_sh,
      batch_sharding=batch_sh,
      batch={
          k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
          for k, (shape, dtype) in batch_spec.items()
      },
      init=jax.jit(init, out_shardings=state_sh),
      step=step,
      seed=seed,
  )


def xla_flops(compiled) -> float:
  """FLOPs of one device's program, as XLA's cost analysis counts them
  (0 where the backend has no cost analysis, e.g. GPU)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))
