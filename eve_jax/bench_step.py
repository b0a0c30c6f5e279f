"""Timed training steps, the bench's machinery (eve_jax/bench.py and the
device check, eve_jax/device_suite.py, step models with it):

  Runner             one compiled training step of a config, its state and a
                     batch, stepped and timed on demand
  time_interleaved   several runners stepped in turn, so that a shared
                     machine's slow drifts hit them alike
  Retimed            a runner timed afresh beside others
  matmul_peak        FLOP/s of one device on a large matmul
  SyntheticVocab     a stand-in tokenizer for configs without EVE-Shapes
"""

from __future__ import annotations

import dataclasses
import statistics
import time


@dataclasses.dataclass(frozen=True)
class SyntheticVocab:
  """Stands in for a tokenizer when the benchmark makes up its text."""

  vocab_size: int
  pad_id: int = 0
  cls_id: int = 2
  mask_id: int = 3
  special_ids: tuple[int, ...] = (0, 1, 2, 3)

  def word_ids(self, words):
    return [4 + i for i, _ in enumerate(words)]


def matmul_peak(dtype, n: int, reps: int = 10) -> float:
  """FLOP/s of one device on an [n, n] x [n, n] matmul in `dtype`: the best
  of `reps` timed calls after a warm-up (a peak is what the hardware can
  do, so the fastest call, not the median)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / min(times)


def _batch(config, vocab, model_cfg, batch_size: int):
  """One global batch (numpy): EVE-Shapes for shapes configs, else random."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  if config.data.name == "shapes":
    from eve_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    ds = pipeline.make_shapes_dataset(
        seed=config.seed,
        split="train",
        image_size=model_cfg.image_size,
        tokenizer=vocab,
        max_text_len=model_cfg.max_text_len,
        batch_size=batch_size,
    )
    b = next(iter(ds))
    return {k: b[k] for k in ("image", "text", "text_valid")}, "eve-shapes"
  rng = np.random.default_rng(0)
  size = model_cfg.image_size
  text = rng.integers(
      len(vocab.special_ids),
      vocab.vocab_size,
      (batch_size, model_cfg.max_text_len),
  ).astype(np.int32)
  text[:, 0] = vocab.cls_id
  return {
      "image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(
          np.float32
      ),
      "text": text,
      "text_valid": np.ones(text.shape, bool),
  }, "synthetic"


class Runner:
  """One compiled training step of `config` with its state and a batch,
  stepped and timed on demand (so several can be timed interleaved: slow
  drifts of a shared machine then hit all of them alike)."""

  def __init__(self, config, vocab, batch_size: int):
    from eve_jax import sharding, train  # pylint: disable=g-import-not-at-top

    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    config.train.eval_batch_size = batch_size
    self.config, self.batch_size = config, batch_size
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.parse_rules(config.axis_rules)
    sharding.check_batch("batch_size", batch_size, self.mesh, self.rules)
    with sharding.use(self.mesh, self.rules):
      self.prog = train.build_program(config, vocab, self.mesh, self.rules)
      local, self.data = _batch(config, vocab, self.prog.model_cfg, batch_size)
      self.batch = sharding.global_batch(
          local, self.prog.batch_sharding, batch_size
      )
      self.state = self.prog.init(self.prog.init_rng)
      t0 = time.perf_counter()
      self.compiled = self.prog.step.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - t0
    self.times: list[float] = []
    self.metrics = None

  def step(self, timed: bool = True) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    t = time.perf_counter()
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    if timed:
      self.times.append(time.perf_counter() - t)

  def summary(self) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from eve_jax.program import xla_flops  # pylint: disable=g-import-not-at-top
    from eve_jax.flops import train_flops_per_sample  # pylint: disable=g-import-not-at-top

    step_s = statistics.median(self.times)
    flops = train_flops_per_sample(
        self.prog.model_cfg,
        self.prog.task.objectives,
        image_mask_ratio=self.config.masking.image_mask_ratio,
        batch_size=self.batch_size,
    )
    mem = self.compiled.memory_analysis()
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      peak_mem, mem_source = int(stats["peak_bytes_in_use"]), "device"
    else:  # CPU: what XLA planned for the step's buffers
      peak_mem = int(
          mem.argument_size_in_bytes
          + mem.output_size_in_bytes
          + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes
      )
      mem_source = "xla_memory_analysis"
    return {
        "step_s": step_s,
        "step_s_min": min(self.times),
        "samples_per_s": self.batch_size / step_s,
        "flops_per_sample_analytic": flops["total"],
        "flops_per_sample_xla": (
            xla_flops(self.compiled) * self.mesh.size / self.batch_size
        ),
        "compile_s": self.compile_s,
        "peak_memory_bytes": peak_mem,
        "peak_memory_source": mem_source,
        "dropped_token_frac": float(self.metrics["dropped_token_frac"]),
        "loss": float(self.metrics["loss"]),
        "data": self.data,
    }


class Retimed:
  """A runner timed afresh (its earlier times kept aside)."""

  def __init__(self, runner: Runner):
    self.runner = runner
    runner.times = []

  def step(self, timed: bool = True) -> None:
    self.runner.step(timed)

  def summary(self) -> dict:
    return self.runner.summary()


def time_interleaved(runners: dict, steps: int, warmup: int) -> None:
  """Warms up, then steps every runner `steps` times, interleaved (every
  model sees the same drift of a shared machine) and rotated (each follows
  each other equally often)."""
  order = list(runners.values())
  for r in order:
    for _ in range(warmup):
      r.step(timed=False)
  for i in range(steps):
    for r in order[i % len(order) :] + order[: i % len(order)]:
      r.step()
