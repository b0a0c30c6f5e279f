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
  accum        step time and peak memory of the step at the config's
               train.grad_accum_steps K (4 where it is 1) against K = 1, the
               same global batch (--compare=accum): what accumulation costs
               in time for what it saves in memory.

The step is the real training step (train.build_program): forward, backward
and AdamW update, parameters and optimizer state donated. EVE-Shapes
configs use real EVE-Shapes batches; the others random images and ids.
Any --config.KEY=VALUE override applies (e.g. --config.model.dtype=bfloat16,
--config.model.remat=True, --config.mesh.expert=8).
"""

from __future__ import annotations

import json
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from eve_jax import versions
from eve_jax.bench_step import (
    Retimed,
    Runner,
    SyntheticVocab,
    matmul_peak,
    time_interleaved,
)

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
    ["dense", "objectives", "scan", "accum"],
    "Also measure the dense model, the other objective sets, the "
    "model with model.scan_layers flipped and/or the step with gradient "
    "accumulation against the step without.",
)
_OBJECTIVES = flags.DEFINE_string(
    "objectives",
    None,
    "Objectives of the measured step, e.g. mlm,itc,itm "
    "(default: the config's, mlm,mim).",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_SUITE = flags.DEFINE_enum(
    "suite",
    None,
    ["device"],
    "device: the device check of eve_jax/device_suite.py (EVE-Base on one "
    "accelerator: dispatch, attention, remat, dense, largest batch, input "
    "pipeline); --config defaults to configs/base.py, --batch_size is per "
    "device (default 32).",
)
_BUDGET = flags.DEFINE_float(
    "budget_s", 420.0, "--suite=device: skip comparisons past this."
)
_MATMUL_N = flags.DEFINE_integer(
    "matmul_size",
    0,
    "Side of the peak-FLOPs " "matmul; 0 = 2048 on CPU, 8192 otherwise.",
)

OBJECTIVE_SETS = ("mlm,mim", "mlm,itc,itm", "mlm,mim,itc,itm")


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
  # --compare=accum: the config's K against 1, or 4 against the config's 1.
  k_accum = config.train.get("grad_accum_steps", 1)
  k_compared = k_accum if k_accum > 1 else 4
  if "accum" in compare:
    accum_cfg = config.copy_and_resolve_references()
    accum_cfg.train.grad_accum_steps = 1 if k_accum > 1 else k_compared
    phase1["accum"] = Runner(accum_cfg, vocab, batch_size)
  time_interleaved(phase1, steps, warmup)
  results = {k: r.summary() for k, r in phase1.items()}
  del phase1
  if "objectives" in compare:
    phase2 = {config.objectives: Retimed(main_runner)}
    for objectives in OBJECTIVE_SETS:
      if objectives != config.objectives:
        c = config.copy_and_resolve_references()
        c.objectives = objectives
        phase2[objectives] = Runner(c, vocab, batch_size)
    time_interleaved(phase2, steps, warmup)
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
  if "accum" in results:
    a, b = main, results["accum"]
    accum, whole = (a, b) if k_accum > 1 else (b, a)
    out["accum"] = dict(
        grad_accum_steps=k_compared,
        accum_step_s=accum["step_s"],
        whole_step_s=whole["step_s"],
        accum_peak_memory_bytes=accum["peak_memory_bytes"],
        whole_peak_memory_bytes=whole["peak_memory_bytes"],
    )
    out["accum_step_over_whole"] = accum["step_s"] / whole["step_s"]
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
  if _SUITE.value == "device":
    _device_suite()
    return
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
    _fail(e)
  out["versions"] = versions.stack()
  print(json.dumps(out) if _JSON.value else _table(out))


def _fail(e: Exception) -> None:
  print(
      f"eve_jax.bench: error: {str(e).strip().splitlines()[0]}",
      file=sys.stderr,
  )
  sys.exit(1)


def _device_suite() -> None:
  from eve_jax import config_lib, device_suite  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value or config_lib.from_file("base")
  log = lambda s: print(f"device suite: {s}", file=sys.stderr, flush=True)  # noqa: E731
  try:
    out = device_suite.run(
        config,
        per_device_batch=_BATCH.value or 32,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        budget_s=_BUDGET.value,
        log=log,
    )
  except ValueError as e:
    _fail(e)
  out["versions"] = versions.stack()
  print(json.dumps(out) if _JSON.value else out["markdown"])


if __name__ == "__main__":
  app.run(main)
