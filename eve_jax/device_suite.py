r"""The device check: EVE-Base's real training step on one accelerator and
the switches that decide its speed there, in one command of a few minutes.

  python -m eve_jax.bench --suite=device [--config=configs/base.py] [--json]

Each comparison is two models stepped in turn in this one process (the
bench's interleaving), the baseline retimed beside each, so that every
ratio is taken on the same card in the same minutes:

  dispatch     capacity (moe_dispatch=gather) vs dropless (ragged)
  attention    einsum vs the fused kernel (cudnn on GPU, xla elsewhere)
  remat        off vs on
  dense        the MoE model over its dense twin of the same active FLOPs
  max_batch    the largest per-device batch (doubling from the suite's)
               whose compiled step fits the device's memory
  pipeline     EVE-Shapes input pipeline samples/s at the model's image
               size, and per read thread

The baseline: the config at bf16 compute with the hard-router blocks
scanned (shorter compiles), per-device batch --batch_size (default 32).
MFU is against the card's published dense bf16 peak where eve_jax knows
the card (H100 / H200: 989 TFLOP/s; TPU chips), else the bench's measured
matmul peak, and says which. A comparison that would start past
--budget_s is skipped and named. `markdown` holds the BENCHMARKS.md rows,
with the card's name.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

PIPELINE_BATCHES = 8


def published_peak(device_kind: str) -> tuple[float, str] | None:
  """(dense bf16 FLOP/s, name) of a card eve_jax's targets describe, by the
  device kind JAX reports ("NVIDIA H100 80GB HBM3", "TPU v5p", ...)."""
  from eve_jax.aot import targets  # pylint: disable=g-import-not-at-top

  kind = device_kind.lower()
  for gpu in targets.GPUS.values():
    if gpu.device_name.lower() == kind or gpu.chip.name.lower() in kind:
      return gpu.chip.peak_flops, gpu.chip.name
  for name, chip in targets.TPU_CHIPS.items():
    if kind.replace(" lite", "e").endswith(name):
      return chip.peak_flops, chip.name
  return None


def _pipeline_rate(config, vocab, image_size: int, text_len: int, batch: int):
  """EVE-Shapes batches/s of the grain pipeline as training builds it."""
  from eve_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  threads = int(config.data.get("num_threads", 2) or 2)
  it = iter(
      pipeline.make_shapes_dataset(
          split="train",
          seed=config.seed,
          batch_size=batch,
          image_size=image_size,
          tokenizer=vocab,
          max_text_len=text_len,
          num_threads=threads,
          prefetch_batches=max(4, threads),
      )
  )
  next(it)  # threads started, first batch made
  t = time.perf_counter()
  for _ in range(PIPELINE_BATCHES):
    next(it)
  rate = PIPELINE_BATCHES * batch / (time.perf_counter() - t)
  return dict(
      samples_per_s=rate,
      threads=threads,
      samples_per_s_per_thread=rate / threads,
  )


def _fits(config, vocab_size: int, batch: int) -> tuple[bool, int]:
  """Whether the step at global `batch` compiles within the device's
  memory (the step `python -m eve_jax.compile` builds, for this host's
  devices), and its bytes (`report.memory`'s total)."""
  import jax  # pylint: disable=g-import-not-at-top

  from eve_jax.aot import build, report  # pylint: disable=g-import-not-at-top

  c = config.copy_and_resolve_references()
  c.train.batch_size = c.train.eval_batch_size = batch
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  built = build.lower_step(c, jax.devices(), vocab_size=vocab_size)
  try:
    compiled = built.lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if report.is_out_of_memory(e):
      return False, 0
    raise
  total = report.memory(compiled)["total"]
  return (limit is None or total <= limit), total


def run(
    config,
    *,
    per_device_batch: int = 32,
    steps: int = 5,
    warmup: int = 1,
    budget_s: float = 420.0,
    max_batch_doublings: int = 3,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
  """The suite's JSON object (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top

  from eve_jax import bench_step as bench  # pylint: disable=g-import-not-at-top
  from eve_jax.data.tokenizer import shapes_tokenizer  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  base = config.copy_and_resolve_references()
  base.model.dtype = "bfloat16"
  base.model.scan_layers = True
  dev = jax.devices()[0]
  n_dev = jax.device_count()
  batch = per_device_batch * n_dev
  # EVE-Shapes captions tokenized (the input pipeline measured below);
  # the model steps on EVE-Shapes batches for shapes configs, else on
  # random ids of the config's vocabulary (as the bench does).
  with tempfile.TemporaryDirectory() as d:
    shapes_vocab = shapes_tokenizer(
        os.path.join(d, "tokenizer.model"),
        vocab_size=min(int(base.data.vocab_size), 64),
        num_captions=int(base.data.get("num_tokenizer_captions", 2000)),
        seed=base.seed,
    )
  vocab = (
      shapes_vocab
      if base.data.name == "shapes"
      else bench.SyntheticVocab(base.data.vocab_size)
  )
  fused = "cudnn" if dev.platform == "gpu" else "xla"
  comparisons = {
      "dispatch": ("model.moe_dispatch", "ragged"),
      "attention": ("model.attention", fused),
      "remat": ("model.remat", True),
      "dense": ("model.soft_ffn", "dense"),
  }
  log(
      f"baseline: {base.model.variant}, batch {batch} on {n_dev} x {dev.device_kind}"
  )
  baseline = bench.Runner(base, vocab, batch)
  out: dict[str, Any] = dict(
      device=f"{n_dev} x {dev.device_kind} ({dev.platform})",
      config=base.model.variant,
      batch=batch,
      per_device_batch=per_device_batch,
      skipped=[],
  )
  last_base = None  # the baseline's summary beside the last comparison
  for name, (key, value) in comparisons.items():
    if time.perf_counter() - t_start > budget_s:
      out["skipped"].append(name)
      continue
    c = base.copy_and_resolve_references()
    section, field = key.split(".")
    c[section][field] = value
    log(f"{name}: {key}={value}")
    try:
      other = bench.Runner(c, vocab, batch)
    except ValueError as e:  # e.g. cudnn attention on a card without it
      out[name] = dict(error=str(e).strip().splitlines()[0])
      continue
    runners = {"base": bench.Retimed(baseline), name: other}
    bench.time_interleaved(runners, steps, warmup)
    a, b = runners["base"].summary(), other.summary()
    last_base = a
    out[name] = {
        "setting": f"{key}={value}",
        "base_step_s": a["step_s"],
        "step_s": b["step_s"],
        "over_base": b["step_s"] / a["step_s"],
        "base_dropped_token_frac": a["dropped_token_frac"],
        "dropped_token_frac": b["dropped_token_frac"],
        "peak_memory_bytes": b["peak_memory_bytes"],
    }
    if name == "dense":  # the MoE model's step over its dense twin's
      out[name]["moe_over_dense"] = a["step_s"] / b["step_s"]
    del runners, other
  a = last_base or baseline.summary()
  known = published_peak(dev.device_kind)
  if known:
    peak, peak_source = known[0] * n_dev, f"published ({known[1]})"
  else:
    peak = bench.matmul_peak(
        jax.numpy.bfloat16, 8192 if dev.platform != "cpu" else 1024
    )
    peak, peak_source = peak * n_dev, "measured matmul"
  out.update(
      step_s=a["step_s"],
      samples_per_s=a["samples_per_s"],
      flops_per_sample_analytic=a["flops_per_sample_analytic"],
      peak_flops=peak,
      peak_source=peak_source,
      mfu=a["samples_per_s"] * a["flops_per_sample_analytic"] / peak,
      peak_memory_bytes=a["peak_memory_bytes"],
      compile_s=baseline.compile_s,
  )
  del baseline
  if time.perf_counter() - t_start <= budget_s:
    fits_at = per_device_batch
    for _ in range(max_batch_doublings):
      trial = fits_at * 2
      ok, _ = _fits(base, vocab.vocab_size, trial * n_dev)
      log(f"max_batch: {trial} per device {'fits' if ok else 'does not fit'}")
      if not ok:
        break
      fits_at = trial
      if time.perf_counter() - t_start > budget_s:
        break
    out["max_per_device_batch"] = fits_at
  else:
    out["skipped"].append("max_batch")
  from eve_jax.model.variants import ModelConfig  # pylint: disable=g-import-not-at-top

  mc = ModelConfig.from_config(base.model, vocab_size=vocab.vocab_size)
  out["pipeline"] = _pipeline_rate(
      base, shapes_vocab, mc.image_size, mc.max_text_len, per_device_batch
  )
  out["suite_s"] = time.perf_counter() - t_start
  out["markdown"] = markdown(out)
  return out


def markdown(out: dict[str, Any]) -> str:
  """BENCHMARKS.md rows of a suite's result (measured on `device`): each
  comparison beside the baseline it was stepped with."""
  lines = [
      f"Device check on {out['device']}: {out['config']}, bf16, scanned "
      f"hard-router blocks, batch {out['batch']} "
      f"({out['per_device_batch']} per device).",
      "",
      "| what | setting | baseline step | its step | ratio | dropped "
      "assignments (baseline) |",
      "|---|---|---|---|---|---|",
  ]
  for name in ("dispatch", "attention", "remat", "dense"):
    r = out.get(name)
    if not r or "error" in r:
      why = r["error"] if r else "skipped (--budget_s)"
      lines.append(f"| {name} | {why} | - | - | - | - |")
      continue
    ratio = (
        f"MoE over dense {r['moe_over_dense']:.3f}"
        if name == "dense"
        else f"{r['over_base']:.3f}"
    )
    lines.append(
        f"| {name} | `{r['setting']}` | {r['base_step_s'] * 1e3:.1f} ms | "
        f"{r['step_s'] * 1e3:.1f} ms | {ratio} | "
        f"{r['dropped_token_frac']:.3f} ({r['base_dropped_token_frac']:.3f}) |"
    )
  pipe = out["pipeline"]
  lines += [
      "",
      f"Baseline {out['step_s'] * 1e3:.1f} ms a step, MFU {out['mfu']:.3f} "
      f"against {out['peak_flops'] / 1e12:.3g} TFLOP/s "
      f"({out['peak_source']}); largest per-device batch that fits: "
      f"{out.get('max_per_device_batch', 'not measured')}; input pipeline "
      f"{pipe['samples_per_s']:.0f} samples/s on {pipe['threads']} threads "
      f"({pipe['samples_per_s_per_thread']:.0f} per thread).",
  ]
  return "\n".join(lines)
