r"""Input pipeline throughput: python -m eve_jax.data.bench.

  python -m eve_jax.data.bench --config=configs/base.py \
      --config.data.dir=/data/eve [--batches 50] [--json]

Builds the training input exactly as `eve_jax.main` would for this process
(mixture, decode, random resized crop, flip, tokenize, batch) and times
`--batches` batches after `--warmup` ones. Reports samples/s and samples/s
per CPU core (the cores this process may run on), which is what sizing a
host for an accelerator needs: EVE-Base at 1,200 samples/s on one H100
needs 1,200 / samples_per_s_per_core cores of decoding.

Without --config.data.dir the built-in EVE-Shapes renderer is timed instead
(no JPEG decoding: not comparable).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Rows per batch; 0 = the config's train.batch_size."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def measure(config, batches: int, warmup: int) -> dict:
  """Samples/s of `sources.make_train_data(config)` in this process."""
  from eve_jax.data import run_tokenizer, sources  # pylint: disable=g-import-not-at-top
  from eve_jax.model.variants import ModelConfig  # pylint: disable=g-import-not-at-top

  sources.check_data(config)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = run_tokenizer.build_tokenizer(config, tmp)
  model_cfg = ModelConfig.from_config(
      config.model, vocab_size=tokenizer.vocab_size
  )
  it = iter(sources.make_train_data(config, tokenizer, model_cfg))
  for _ in range(warmup):
    next(it)
  t0, cpu0 = time.perf_counter(), time.process_time()
  rows = 0
  for _ in range(batches):
    rows += len(next(it)["text"])
  wall = time.perf_counter() - t0
  cpu = time.process_time() - cpu0
  cores = len(os.sched_getaffinity(0))
  sps = rows / wall
  return dict(
      data="corpora" if sources.uses_corpora(config) else "shapes",
      mixture=config.data.get("mixture", ""),
      image_size=model_cfg.image_size,
      batch=config.train.batch_size,
      batches=batches,
      num_threads=config.data.get("num_threads", 0),
      cores=cores,
      samples_per_s=sps,
      samples_per_s_per_core=sps / cores,
      cpu_utilization=cpu / wall / cores,
      skipped_images=getattr(it, "skipped", 0),
  )


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  if _BATCH_SIZE.value:
    config.train.batch_size = _BATCH_SIZE.value
  try:
    out = measure(config, _BATCHES.value, _WARMUP.value)
  except ValueError as e:  # DataError and config errors: one line
    print(f"eve_jax: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value:
    print(json.dumps(out, sort_keys=True))
  else:
    for k, v in out.items():
      print(f"{k:>24}  {v:.4g}" if isinstance(v, float) else f"{k:>24}  {v}")


if __name__ == "__main__":
  app.run(main)
