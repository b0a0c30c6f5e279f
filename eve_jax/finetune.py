"""What the fine-tuning tasks (VQA, NLVR2, retrieval) share, as a base class
of the trainer's task contract (eve_jax/tasks/contract.py).

Each task class (eve_jax/tasks/{vqa,nlvr2,retrieval}.py) subclasses
`FineTuning` and adds its data, model, loss and evaluation:
`__init__(config, tokenizer, model_cfg, data_dir=None)`, `train_examples`,
`num_train`, `encode_train`, `build_model`, `batch_spec`, `loss`,
`evaluate(run_eval, workdir, is_main)`, `inference_model(model_cfg, rngs,
**sizes)`. What `FineTuning` adds for every one of them:

  - parameters start from `config.init_from` (a pretraining workdir or a
    converted checkpoint, `eve_jax.pretrained`), the report in
    DIR/init_report.json; `--config.init_from=''` starts from scratch;
  - AdamW with warmup over the first `optim.warmup_frac` of the steps and a
    cosine decay; everything outside `backbone` (the new heads) at
    `optim.head_lr_mult` x the learning rate (`optim.finetune_optimizer`);
  - `train.steps` = `train.epochs` x examples / batch unless set;
  - with `data.shapes` and no `data.dir`, the EVE-Shapes version of every
    task written once into DIR/shapes_tasks (config.json keeps `data.dir`
    as given: empty);
  - evaluation batches laid out on the mesh, outputs gathered back in
    example order (`run_eval`, which each task's `evaluate` calls).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from eve_jax import flops as flops_lib
from eve_jax import pretrained, sharding, storage
from eve_jax.data import finetune_data
from eve_jax.data.errors import DataError, not_in_a_bucket
from eve_jax.data.run_tokenizer import build_tokenizer, copy_tokenizer
from eve_jax.data.tokenizer import Tokenizer, load_tokenizer, shapes_tokenizer
from eve_jax.model.variants import ModelConfig
from eve_jax.optim import finetune_optimizer
from eve_jax.tasks.contract import RunContext


def train_steps(config, num_train: int) -> int:
  """`train.steps`, else `train.epochs` x examples / batch."""
  return config.train.steps or math.ceil(
      config.train.epochs * num_train / config.train.batch_size
  )


def shapes_tasks_dir(config, workdir: str) -> str:
  """Where a run with `data.shapes` and no `data.dir` reads its task's
  EVE-Shapes files: DIR/shapes_tasks/{task}."""
  return os.path.join(shapes_tasks_root(config, workdir), config.task)


def shapes_tasks_root(config, workdir: str) -> str:
  """DIR/shapes_tasks; for a `gs://` workdir a local cache folder on each
  host (the downstream readers take local files; the tasks are a function
  of the seed and image size, made again where the cache is gone)."""
  if storage.is_gcs(workdir):
    name = f"seed{config.seed}-{config.model.image_size}px-" + workdir[
        len(storage.GCS) :
    ].strip("/").replace("/", "+")
    return os.path.join(tempfile.gettempdir(), "eve_jax-shapes_tasks", name)
  return os.path.join(workdir, "shapes_tasks")


class FineTuning:
  """The fine-tuning half of the task contract; subclasses add the task.

  A subclass instance made by `setup` also has: config, workdir, steps.
  """

  name = "finetune"

  # -- what each task provides (see the module docstring) -------------------

  def __init__(
      self,
      config,
      tokenizer: Tokenizer,
      model_cfg: ModelConfig,
      data_dir: str | None = None,
  ):
    raise NotImplementedError

  # -- building ------------------------------------------------------------

  @classmethod
  def check(cls, config, workdir: str) -> None:
    del workdir
    ModelConfig.from_config(config.model)  # a bad model key: before files
    if storage.is_gcs(config.data.dir):
      raise not_in_a_bucket(
          "config.data.dir",
          config.data.dir,
          "the downstream task files are read from local paths only",
      )
    if config.init_from:
      pretrained.read_config(config.init_from)  # fail before anything else

  @classmethod
  def setup(cls, config, workdir: str, is_main: bool) -> FineTuning:
    data_dir = config.data.dir
    if config.data.get("shapes", False) and not data_dir:
      data_dir = _write_shapes_tasks(config, workdir, is_main)
    tokenizer = build_tokenizer(config, workdir, make=_make_tokenizer)
    model_cfg = ModelConfig.from_config(
        config.model, vocab_size=tokenizer.vocab_size
    )
    self = cls(config, tokenizer, model_cfg, data_dir=data_dir)
    self.config, self.workdir = config, workdir
    self.steps = train_steps(config, self.num_train)
    self._resolved = (
        {} if data_dir == config.data.dir else {"data.dir": data_dir}
    )
    logging.info(
        "%s: %d training examples, %d steps of %d",
        self.name,
        self.num_train,
        self.steps,
        config.train.batch_size,
    )
    return self

  @classmethod
  def for_compile(cls, config, tokenizer, **sizes) -> FineTuning:
    """The task with no examples, enough to build its model and training
    step; no file is read. A task whose model needs a size the data would
    give (VQA's answers) sets it in `_sizes`."""
    self = cls.__new__(cls)
    self.config, self.workdir = config, ""
    self.tokenizer = tokenizer
    self.model_cfg = ModelConfig.from_config(
        config.model, vocab_size=tokenizer.vocab_size
    )
    self.train_examples, self.num_train = [], 0
    self.steps = max(config.train.steps, 1)
    self._resolved = {}
    self._sizes(config, **sizes)
    return self

  def _sizes(self, config, **sizes) -> None:
    del config, sizes

  def optimizer(self):
    return finetune_optimizer(self.config.optim, self.steps)

  def analytic_flops_per_sample(self, batch_size: int) -> float:
    return flops_lib.finetune_flops_per_sample(
        self.model_cfg, self.name, batch_size
    )

  # -- running -------------------------------------------------------------

  def train_batches(self, shard: tuple[int, int]):
    return finetune_data.train_batches(
        self.train_examples,
        self.encode_train,
        batch_size=self.config.train.batch_size // shard[1],
        seed=self.config.seed,
        process_index=shard[0],
        process_count=shard[1],
        num_threads=self.config.data.num_threads,
    )

  def initial_state(self, state, ctx: RunContext):
    if not self.config.init_from:
      return state
    return _load_pretrained(
        self.config,
        state,
        ctx.program.state_shardings,
        self.model_cfg,
        ctx.workdir,
        ctx.is_main,
    )

  def run_info(self, program) -> dict[str, Any]:
    del program
    return {"total_steps": self.steps}

  def log_extra(self, train_batches):
    del train_batches
    return None

  def resolved_config(self) -> dict[str, Any]:
    return dict(self._resolved)

  def evaluator(self, ctx: RunContext):
    run_eval = _EvalRunner(ctx)
    return lambda state: self.evaluate(
        functools.partial(run_eval, params=state.params),
        ctx.workdir,
        ctx.is_main,
    )


class _EvalRunner:
  """run_eval(examples, encode, fn, params=) for a task's `evaluate`: fn
  (model, batch) -> [b, ...] per example over all `examples` (a jit per fn,
  batches laid out on the mesh), returned as NumPy [len(examples), ...] in
  example order on every process."""

  def __init__(self, ctx: RunContext):
    self.ctx = ctx
    self.compiled = {}

  def __call__(self, examples, encode, fn, *, params):
    ctx, eval_bs = self.ctx, self.ctx.config.train.eval_batch_size
    if fn not in self.compiled:
      self.compiled[fn] = _eval_fn(
          fn,
          ctx.program.graphdef,
          ctx.program.state_shardings.params,
          ctx.eval_sharding,
      )
    compiled = self.compiled[fn]
    outs, rows = [], []
    for batch in finetune_data.eval_batches(
        examples,
        encode,
        global_batch=eval_bs,
        process_index=ctx.eval_shard[0],
        process_count=ctx.eval_shard[1],
        num_threads=ctx.config.data.num_threads,
    ):
      g = sharding.global_batch(batch, ctx.eval_sharding, eval_bs)
      out, row = jax.device_get(compiled(params, g))
      outs.append(out)
      rows.append(row)
    out, row = np.concatenate(outs), np.concatenate(rows).astype(np.int64)
    # Padding rows (-1) sort last; every real row appears exactly once.
    order = np.argsort(np.where(row < 0, len(examples), row), kind="stable")[
        : len(examples)
    ]
    if not np.array_equal(row[order], np.arange(len(examples))):
      raise RuntimeError("evaluation lost or repeated examples")
    return out[order]


def _eval_fn(fn, graphdef, params_sh, eval_sh):
  """jit of fn(model, batch) -> (outputs, rows), batch laid out on the mesh
  and the outputs gathered to every device."""
  replicated = jax.sharding.NamedSharding(
      eval_sh.mesh, jax.sharding.PartitionSpec()
  )

  def f(params, batch):
    model = nnx.merge(graphdef, params)
    return fn(model, batch), batch["row"]

  return jax.jit(f, in_shardings=(params_sh, eval_sh), out_shardings=replicated)


def _make_tokenizer(config, path: str) -> Tokenizer:
  """For `run_tokenizer.build_tokenizer`: DIR/tokenizer.model once made; else
  `data.tokenizer`, the init_from run's, or (EVE-Shapes tasks) the one tiny
  pretraining trains."""
  if storage.exists(path):
    return load_tokenizer(path)
  source = config.data.tokenizer or (
      pretrained.tokenizer_path(config.init_from) if config.init_from else ""
  )
  if source:
    return copy_tokenizer(source, path)
  if config.data.get("shapes", False):
    return shapes_tokenizer(
        path, vocab_size=64, num_captions=4000, seed=config.seed
    )
  raise DataError(
      "no tokenizer: set --config.init_from (a pretraining "
      "workdir) or --config.data.tokenizer"
  )


def _write_shapes_tasks(config, workdir: str, is_main: bool) -> str:
  """EVE-Shapes versions of the tasks in the official formats, written
  once into DIR/shapes_tasks; returns this task's folder."""
  from eve_jax.data import shapes_tasks  # pylint: disable=g-import-not-at-top

  root = shapes_tasks_root(config, workdir)
  done = os.path.join(root, "written")
  if storage.is_gcs(workdir):
    # Every process makes the local cache of its host, if no process of
    # the host has yet: written aside and renamed, so that processes
    # sharing a host never read a half-written folder.
    if not os.path.exists(done):
      tmp = f"{root}.tmp{os.getpid()}"
      shapes_tasks.write_all(
          tmp, image_size=config.model.image_size, seed=config.seed
      )
      with open(os.path.join(tmp, "written"), "w") as f:
        f.write("ok\n")
      try:
        os.rename(tmp, root)
      except OSError:  # another process of this host was first
        shutil.rmtree(tmp, ignore_errors=True)
  elif is_main and not os.path.exists(done):
    logging.info("writing the EVE-Shapes downstream tasks to %s", root)
    shapes_tasks.write_all(
        root, image_size=config.model.image_size, seed=config.seed
    )
    with open(done, "w") as f:
      f.write("ok\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("eve_jax shapes tasks written")
  return shapes_tasks_dir(config, workdir)


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
  logging.info(
      "init_from %s (step %d): %s",
      config.init_from,
      step,
      pretrained.summary(report),
  )
  if is_main:
    text = json.dumps(
        dict(
            report, init_from=storage.absolute(config.init_from), step=int(step)
        ),
        indent=1,
    )
    if storage.is_gcs(workdir):
      storage.write_text(os.path.join(workdir, "init_report.json"), text)
    else:
      with open(os.path.join(workdir, "init_report.json"), "w") as f:
        f.write(text)
  # The optimizer moments start at zero either way; only params change.
  return state.replace(params=new_params)
