r"""Training-step benchmark: samples/s, MFU, MoE vs dense, objective costs.

  python -m eve_jax.bench --config=configs/base.py:small [--steps 10] \
      [--batch_size 16] [--objectives=mlm,mim] [--compare=dense] \
      [--compare=objectives] [--compare=scan] [--json]

Everything is measured in one process, so ratios compare like with like;
the models being compared are stepped in turn (A, B, A, B, ...) so that a
shared machine's slow drifts hit them alike, and step_s is the median.
  peak_flops   a large matmul in the model's compute dtype, timed here before
               and after the steps (the best call), times the number of
               devices;
  mfu          samples_per_s * flops_per_sample_analytic / peak_flops, the
               analytic count being eve_jax.flops (active experts only);
  moe_step_over_dense  step time of the model over the same model with every
               soft-router MoE replaced by a dense FFN of the same active
               FLOPs (--compare=dense);
  objectives   samples/s of mlm,mim against mlm,itc,itm and mlm,mim,itc,itm
               at the same batch (--compare=objectives; the paper's Table 1).
  scan         step and compile time of the model with the hard-router
               blocks scanned (model.scan_layers) and unrolled
               (--compare=scan). XLA's cost analysis counts a scanned
               block once, not once per layer: flops_per_sample_xla is low
               for a scanned model; the analytic count is not.

The step is the real training step (train.build_program): forward, backward
and AdamW update, parameters and optimizer state donated. EVE-Shapes
configs use real EVE-Shapes batches; the others random images and ids.
Any --config.KEY=VALUE override applies (e.g. --config.model.dtype=bfloat16,
--config.model.remat=True, --config.mesh.expert=8).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from eve_jax import versions

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/base.py:small.",
    lock_config=False,
)
_STEPS = flags.DEFINE_integer(
    "steps", 10, "Timed steps (the median is " "reported)."
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Global batch; 0 = the " "config's train.batch_size."
)
_COMPARE = flags.DEFINE_multi_enum(
    "compare",
    [],
    ["dense", "objectives", "scan"],
    "Also measure the dense model, the other objective sets and/or the "
    "model with model.scan_layers flipped.",
)
_OBJECTIVES = flags.DEFINE_string(
    "objectives",
    None,
    "Objectives of the measured step, e.g. mlm,itc,itm "
    "(default: the config's, mlm,mim).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_MATMUL_N = flags.DEFINE_integer(
    "matmul_size",
    0,
    "Side of the peak-FLOPs " "matmul; 0 = 2048 on CPU, 8192 otherwise.",
)

OBJECTIVE_SETS = ("mlm,mim", "mlm,itc,itm", "mlm,mim,itc,itm")


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


class _Retimed:
  """A runner timed afresh (its earlier times kept aside)."""

  def __init__(self, runner: Runner):
    self.runner = runner
    runner.times = []

  def step(self, timed: bool = True) -> None:
    self.runner.step(timed)

  def summary(self) -> dict:
    return self.runner.summary()


def _time_interleaved(runners: dict, steps: int, warmup: int) -> None:
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


def run(
    config,
    *,
    steps: int,
    warmup: int,
    batch_size: int,
    compare=(),
    matmul_size: int = 0,
) -> dict:
  """The benchmark's JSON object (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  batch_size = batch_size or config.train.batch_size
  if config.data.name == "shapes":
    from eve_jax.data.tokenizer import shapes_tokenizer  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as d:
      vocab = shapes_tokenizer(
          f"{d}/tokenizer.model",
          vocab_size=config.data.vocab_size,
          num_captions=config.data.num_tokenizer_captions,
          seed=config.seed,
      )
  else:
    vocab = SyntheticVocab(config.data.vocab_size)
  dtype = jnp.dtype(config.model.dtype)
  dev = jax.devices()[0]
  n = matmul_size or (2048 if dev.platform == "cpu" else 8192)

  main_runner = Runner(config, vocab, batch_size)
  peak = matmul_peak(dtype, n)
  # Phase 1: the model (and its dense twin). Phase 2: the other objective
  # sets against the model, once phase 1's runners are gone: several big
  # models held at once slow each other down (measured: 1.05 -> 1.18 for
  # the MoE/dense ratio on a 2-core CPU), so each phase holds only its own.
  phase1 = {"main": main_runner}
  if "dense" in compare:
    dense_cfg = config.copy_and_resolve_references()
    dense_cfg.model.soft_ffn = "dense"
    phase1["dense"] = Runner(dense_cfg, vocab, batch_size)
  if "scan" in compare:
    scan_cfg = config.copy_and_resolve_references()
    scan_cfg.model.scan_layers = not config.model.scan_layers
    phase1["scan"] = Runner(scan_cfg, vocab, batch_size)
  _time_interleaved(phase1, steps, warmup)
  results = {k: r.summary() for k, r in phase1.items()}
  del phase1
  if "objectives" in compare:
    phase2 = {config.objectives: _Retimed(main_runner)}
    for objectives in OBJECTIVE_SETS:
      if objectives != config.objectives:
        c = config.copy_and_resolve_references()
        c.objectives = objectives
        phase2[objectives] = Runner(c, vocab, batch_size)
    _time_interleaved(phase2, steps, warmup)
    results["objectives"] = {
        k: r.summary()["samples_per_s"] for k, r in phase2.items()
    }
    del phase2
  peak = max(peak, matmul_peak(dtype, n)) * jax.device_count()

  main = results["main"]
  out = {
      "config": config.model.variant,
      "device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
      "dtype": str(dtype),
      "batch": batch_size,
      "objectives": config.objectives,
      **main,
      "peak_flops": peak,
      "peak_matmul_size": n,
  }
  out["mfu"] = out["samples_per_s"] * out["flops_per_sample_analytic"] / peak
  out["flops_xla_over_analytic"] = (
      out["flops_per_sample_xla"] / out["flops_per_sample_analytic"]
  )
  if "dense" in results:
    dense = results["dense"]
    out["dense_step_s"] = dense["step_s"]
    out["dense_samples_per_s"] = dense["samples_per_s"]
    out["moe_step_over_dense"] = main["step_s"] / dense["step_s"]
  if "scan" in results:
    a, b = main, results["scan"]
    scanned, unrolled = (a, b) if config.model.scan_layers else (b, a)
    out["scan"] = dict(
        scanned_step_s=scanned["step_s"],
        unrolled_step_s=unrolled["step_s"],
        scanned_compile_s=scanned["compile_s"],
        unrolled_compile_s=unrolled["compile_s"],
        scanned_peak_memory_bytes=scanned["peak_memory_bytes"],
        unrolled_peak_memory_bytes=unrolled["peak_memory_bytes"],
    )
    out["scan_step_over_unrolled"] = scanned["step_s"] / unrolled["step_s"]
  if "objectives" in results:
    per = {
        o: results["objectives"][o]
        for o in OBJECTIVE_SETS
        if o in results["objectives"]
    }
    out["objectives_samples_per_s"] = per
    out["mlm_mim_over_mlm_itc_itm"] = per["mlm,mim"] / per["mlm,itc,itm"]
  return out


def _table(out: dict) -> str:
  rows = []
  for k, v in out.items():
    if isinstance(v, float):
      v = f"{v:.4g}"
    elif isinstance(v, dict):
      v = ", ".join(
          f"{a}: {b:.4g}" if isinstance(b, float) else f"{a}: {b}"
          for a, b in v.items()
      )
    rows.append(f"{k:<28} {v}")
  return "\n".join(rows)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError(
        "--config is required, e.g. " "--config=configs/base.py:small"
    )
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _OBJECTIVES.value:
    config.objectives = _OBJECTIVES.value
  try:
    out = run(
        config,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        batch_size=_BATCH.value,
        compare=tuple(_COMPARE.value),
        matmul_size=_MATMUL_N.value,
    )
  except ValueError as e:
    print(
        f"eve_jax.bench: error: {str(e).strip().splitlines()[0]}",
        file=sys.stderr,
    )
    sys.exit(1)
  out["versions"] = versions.stack()
  print(json.dumps(out) if _JSON.value else _table(out))


if __name__ == "__main__":
  app.run(main)
