"""What the trainer asks of a task: the one contract every task implements.

The trainer (eve_jax/trainer.py) runs any task the same way and knows none
of them:

  cls = registry.get(config.task)          # eve_jax/tasks/registry.py
  cls.check(config, workdir)               # bad input: before any file
  task = cls.setup(config, workdir, is_main)   # tokenizer, data, model config
  program = trainer.build_program(task, ...)   # build_model, batch_spec,
                                               # loss, optimizer -> AOT step
  state = program.init(...)  |  restored        (task.initial_state on init)
  loop(train_batches(shard), evaluator(context))

Pretraining (eve_jax/train.py: Pretraining) and the fine-tuning tasks
(eve_jax/tasks/{vqa,nlvr2,retrieval}.py, sharing eve_jax/finetune.py:
FineTuning) implement it. A new task is one file with a class that does,
registered by name in registry.py or named by its import path in the config
(`config.task = "my_pkg.my_module:MyTask"`).

Batches are dicts of NumPy arrays per process (train_batches) and of global
jax.Arrays inside the step; the shapes are the ones `batch_spec` declares
(B = the global batch, from `config.train.batch_size`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import ml_collections
import optax
from flax import nnx

from eve_jax import sharding
from eve_jax.data import specs
from eve_jax.model.variants import ModelConfig
from eve_jax.program import StepProgram, TrainState
from eve_jax.writers import MetricWriter


class DataIterator(Protocol):
  """Local training batches with a checkpointable position (a grain
  iterator, or one that behaves like it): the checkpoint stores
  `get_state()` next to the train state and a resumed run calls
  `set_state` with it, so a restart sees exactly the batches it would have
  seen."""

  def __iter__(self) -> Iterator[dict[str, Any]]:
    ...

  def __next__(self) -> dict[str, Any]:
    ...

  def get_state(self) -> Any:
    ...

  def set_state(self, state: Any) -> None:
    ...


@dataclasses.dataclass
class RunContext:
  """What a task's evaluation and initial state may use of the run.

  Attributes:
    config: the run's config (read only: config.json records it as given).
    workdir: the run directory.
    is_main: process 0 (the one that writes files other than checkpoints).
    mesh, rules: where arrays live (`sharding.use` is active during the
      run).
    program: the compiled training step's parts (graphdef, shardings).
    eval_sharding: NamedSharding of one evaluation batch of
      `config.train.eval_batch_size` rows.
    eval_shard: (this process's index, processes) over evaluation data.
    writer: metrics writer (writes on process 0 only); None in the
      context `initial_state` gets (the workdir is not written to before
      the run's config is recorded).
  """

  config: ml_collections.ConfigDict
  workdir: str
  is_main: bool
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  program: StepProgram
  eval_sharding: jax.sharding.NamedSharding
  eval_shard: tuple[int, int]
  writer: MetricWriter | None


class Task(Protocol):
  """A task the trainer runs: its model, data, loss, optimizer and
  evaluation.

  Attributes:
    name: `config.task`'s name for it (log lines).
    model_cfg: the model it trains (tokenizer's vocabulary included).
    steps: training steps of the whole run.
  """

  name: str
  model_cfg: ModelConfig
  steps: int

  @classmethod
  def check(cls, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ValueError (one line) for a config or data it cannot run,
    before anything is written or any device is touched."""

  @classmethod
  def setup(
      cls, config: ml_collections.ConfigDict, workdir: str, is_main: bool
  ) -> Task:
    """The task of this run: makes or reads the tokenizer and the data's
    index (every process; process 0 writes shared files)."""

  @classmethod
  def for_compile(
      cls, config: ml_collections.ConfigDict, tokenizer, **sizes
  ) -> Task:
    """The task without data or files, enough to build its step
    (`python -m eve_jax.compile`); `sizes` stand in for what data would
    tell (VQA's `num_answers`)."""

  @classmethod
  def inference_model(
      cls, model_cfg: ModelConfig, rngs: nnx.Rngs, **sizes
  ) -> nnx.Module:
    """The model a finished run of this task holds (`eve_jax.inference`)."""

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The model to train, initialized from `rngs` (traced, never eager)."""

  def batch_spec(self, batch_size: int) -> specs.Spec:
    """{name: (shape, dtype)} of one global training batch, shape[0] =
    batch_size; only these arrays reach the step."""

  def loss(
      self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, {name: scalar}) of one training batch; traced inside
    the step. The step adds loss, grad_norm, lr and nonfinite."""

  # Optional (the step takes {} where a task has none):
  #   def loss_weights(self, batch) -> dict[str, jax.Array]
  # {metric: [B] float32 weight of each row} for the metrics that are not
  # a mean over the batch's rows (MLM's, a mean over masked tokens),
  # from the batch alone; a name ending in `_loss` is a term of the loss.
  # Gradient accumulation weighs each microbatch's value by it
  # (eve_jax/accum.py).

  def optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its learning-rate schedule over `steps`."""

  def analytic_flops_per_sample(self, batch_size: int) -> float:
    """Training FLOPs per sample by eve_jax/flops.py (compile reports)."""

  def train_batches(self, shard: tuple[int, int]) -> DataIterator:
    """This process's rows of every training batch: `shard` = (process's
    data index, number of data shards); endless or as long as the run."""

  def initial_state(self, state: TrainState, ctx: RunContext) -> TrainState:
    """The state a fresh run starts from, given the randomly initialized
    one (fine-tuning loads `config.init_from` here)."""

  def evaluator(
      self, ctx: RunContext
  ) -> Callable[[TrainState], dict[str, Any]]:
    """state -> the numbers eval.json gets (every process calls it; all
    take part in its collectives)."""

  def run_info(self, program: StepProgram) -> dict[str, Any]:
    """Extra numbers for DIR/run.jsonl's first row of this start."""

  def log_extra(
      self, train_batches: DataIterator
  ) -> Callable[[], dict[str, Any]] | None:
    """Extra numbers for each training log row (e.g. skipped images), or
    None."""

  def resolved_config(self) -> dict[str, Any]:
    """{dotted key: value} the task resolved from an empty config value
    (fine-tuning's EVE-Shapes `data.dir`): a resumed run whose config.json
    recorded that value is the same run."""
