"""The device check (`python -m eve_jax.bench --suite=device`): what it
knows of cards, its BENCHMARKS rows, and one run of it on the CPU at the
tiny size (the numbers that matter come from a GPU or TPU)."""

import json
import os
import subprocess
import sys

import pytest

from eve_jax import device_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_published_peaks_by_device_kind():
  assert device_suite.published_peak("NVIDIA H100 80GB HBM3") == (
      989e12,
      "NVIDIA H100 80GB",
  )
  assert device_suite.published_peak("NVIDIA H200 141GB HBM3e")[0] == 989e12
  assert device_suite.published_peak("TPU v5 lite") == (197e12, "TPU v5e")
  assert device_suite.published_peak("TPU v5p") == (459e12, "TPU v5p")
  assert device_suite.published_peak("TPU v6 lite")[1] == "TPU v6e"
  assert device_suite.published_peak("cpu") is None


def test_markdown_rows_name_the_card_and_each_ratio():
  row = lambda setting, base, step, drop: dict(  # noqa: E731
      setting=setting,
      base_step_s=base,
      step_s=step,
      over_base=step / base,
      base_dropped_token_frac=0.1,
      dropped_token_frac=drop,
      peak_memory_bytes=1,
  )
  out = dict(
      device="1 x NVIDIA H100 80GB HBM3 (gpu)",
      config="base",
      batch=32,
      per_device_batch=32,
      dispatch=row("model.moe_dispatch=ragged", 0.200, 0.180, 0.0),
      attention=dict(error="cudnn attention needs ..."),
      remat=row("model.remat=True", 0.2, 0.25, 0.1),
      dense=dict(
          row("model.soft_ffn=dense", 0.2, 0.16, 0.0), moe_over_dense=1.25
      ),
      step_s=0.2,
      mfu=0.41,
      peak_flops=989e12,
      peak_source="published (NVIDIA H100 80GB)",
      max_per_device_batch=128,
      pipeline=dict(
          samples_per_s=900.0, threads=8, samples_per_s_per_thread=112.5
      ),
  )
  text = device_suite.markdown(out)
  assert "NVIDIA H100 80GB HBM3" in text
  assert (
      "| dispatch | `model.moe_dispatch=ragged` | 200.0 ms | 180.0 ms | 0.900 |"
      in text
  )
  assert "| attention | cudnn attention needs ... |" in text
  assert "MoE over dense 1.250" in text
  assert "against 989 TFLOP/s (published (NVIDIA H100 80GB))" in text
  assert "fits: 128" in text and "900 samples/s on 8 threads" in text


@pytest.mark.slow  # ~4 min on 2 cores
def test_device_suite_runs_on_the_tiny_model(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.bench",
          "--suite=device",
          "--config=configs/base.py:tiny",
          "--batch_size=8",
          "--steps=1",
          "--warmup=1",
          "--json",
      ],
      capture_output=True,
      text=True,
      env=env,
      cwd=REPO,
      timeout=1200,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["device"].endswith("(cpu)") and r["peak_source"] == "measured matmul"
  for name in ("dispatch", "attention", "remat", "dense"):
    assert name in r or name in r["skipped"], name
  assert r["dispatch"]["dropped_token_frac"] == 0.0  # dropless
  assert r["pipeline"]["samples_per_s"] > 0 and 0 < r["mfu"] < 1
  assert r["markdown"].startswith("Device check on 1 x cpu")
