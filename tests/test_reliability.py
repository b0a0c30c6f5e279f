"""Runs that survive bad numbers, bad input and kill -9, losing nothing.

(SIGTERM is in test_train.py, a cut data shard in test_corpora.py.)
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eve_jax import loop, run_config, trainer
from eve_jax.data import sources
from test_train import (
    REPO,
    _flatten,
    micro_config,
    read_jsonl,
    restore_params,
)


def snapshot(workdir, skip=()):
  """{relative path: sha256} of every file under workdir."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, workdir)
      if rel not in skip:
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


class _Poisoned:
  """The training batches with NaN in every float array of the batches
  whose 0-based index satisfies `bad` (batch i feeds step i + 1)."""

  def __init__(self, inner, bad):
    self._inner, self._bad, self._i = inner, bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    if self._bad(self._i):
      batch = {
          k: np.full_like(v, np.nan)
          if np.issubdtype(v.dtype, np.floating)
          else v
          for k, v in batch.items()
      }
    self._i += 1
    return batch

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(
    tmp_path, monkeypatch
):
  """Step 3 gets a NaN batch: skipped (parameters unchanged), counted,
  training goes on. From step 6 every batch is NaN: after
  max_bad_steps=2 the run stops with one line; every checkpoint is finite."""
  real = sources.make_train_data
  monkeypatch.setattr(
      sources,
      "make_train_data",
      lambda *a, **k: _Poisoned(
          iter(real(*a, **k)), lambda i: i == 2 or i >= 5
      ),
  )
  wd = str(tmp_path / "w")
  c = micro_config(
      steps=10, checkpoint_every=1, keep_checkpoints=20, max_bad_steps=2
  )
  with pytest.raises(loop.NonFiniteError) as err:
    trainer.run(c, wd)
  msg = str(err.value)
  assert "\n" not in msg
  assert "not finite for 2 steps in a row (steps 6-7" in msg, msg
  assert "last checkpoint (step 6) is intact" in msg, msg

  rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 0, 0, 1, 1]
  assert rows[2]["loss"] == "nan"
  assert all(np.isfinite(r["loss"]) for r in rows[3:5])
  steps = sorted(
      int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()
  )
  assert steps == [1, 2, 3, 4, 5, 6]
  params = {s: dict(_flatten(restore_params(wd, s))) for s in steps}
  for s in steps:
    assert all(np.isfinite(v).all() for v in params[s].values()), s

  def same(a, b):
    return all(np.array_equal(params[a][k], params[b][k]) for k in params[a])

  assert same(2, 3) and same(5, 6)  # the NaN steps changed nothing
  assert not same(3, 4) and not same(1, 2)  # the others did


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A micro run stopped at its step-2 checkpoint."""
  wd = str(tmp_path_factory.mktemp("finished") / "w")
  trainer.run(micro_config(steps=2, checkpoint_every=1), wd)
  return wd


def _copy(finished, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(finished, wd)
  return wd, snapshot(wd)


def test_another_config_is_refused_and_nothing_is_touched(finished, tmp_path):
  wd, before = _copy(finished, tmp_path)
  c = micro_config(steps=3, checkpoint_every=1)
  c.optim.lr = 2e-3
  with pytest.raises(
      run_config.ConfigChangeError,
      match=r"another config \(optim.lr: 0.001 -> 0.002\); "
      ".*allow_config_change=True",
  ) as err:
    trainer.run(c, wd)
  assert "\n" not in str(err.value)
  assert snapshot(wd) == before

  # Another model, even when config changes are allowed: the first
  # mismatched parameter and both shapes, in one line; nothing touched.
  c = micro_config(steps=3, checkpoint_every=1, allow_config_change=True)
  c.model.update(dict(width=64, mlp_dim=256))
  with pytest.raises(
      ValueError,
      match=r"does not match this model config: "
      r"params\.backbone\.\S+ is \[128, \d+(, \d+)*\] in the "
      r"checkpoint but \[64",
  ) as err:
    trainer.run(c, wd)
  assert "\n" not in str(err.value)
  assert snapshot(wd) == before

  # An unreadable tokenizer: named; nothing else touched.
  with open(os.path.join(wd, "tokenizer.model"), "wb") as f:
    f.write(b"not a sentencepiece model")
  with pytest.raises(
      ValueError, match="corrupt tokenizer model .*" "tokenizer.model"
  ) as err:
    trainer.run(micro_config(steps=3, checkpoint_every=1), wd)
  assert "\n" not in str(err.value)
  assert snapshot(wd, skip=("tokenizer.model",)) == {
      k: v for k, v in before.items() if k != "tokenizer.model"
  }


def test_an_allowed_config_change_keeps_the_old_config(finished, tmp_path):
  wd, _ = _copy(finished, tmp_path)
  c = micro_config(steps=3, checkpoint_every=1, allow_config_change=True)
  c.optim.lr = 2e-3
  trainer.run(c, wd)
  assert [r["step"] for r in read_jsonl(f"{wd}/metrics.jsonl")] == [1, 2, 3]
  for name, lr in (("config.step2.json", 1e-3), ("config.json", 2e-3)):
    with open(os.path.join(wd, name)) as f:
      assert json.load(f)["optim"]["lr"] == lr, name


def test_what_does_not_change_the_run_may_change(finished):
  old = run_config.as_dict(micro_config(steps=2, checkpoint_every=1))
  new = micro_config(steps=5, checkpoint_every=7, log_every=3)
  new.mesh.data = 1
  new.data.num_threads = 1
  new.model.remat = True
  assert run_config.changes(old, run_config.as_dict(new)) == [
      ("train.steps", 2, 5)
  ]
  new.model.moe_dispatch = "einsum"  # the same layer up to rounding
  assert run_config.changes(old, run_config.as_dict(new)) == [
      ("train.steps", 2, 5)
  ]
  new.seed = 3
  new.masking.image_mask_ratio = 0.5
  assert [
      k for k, _, _ in run_config.changes(old, run_config.as_dict(new))
  ] == ["masking.image_mask_ratio", "seed", "train.steps"]
  # The dropless MoE keeps what a capacity drops: another run.
  new.model.moe_dispatch = "ragged"
  assert ("model.moe_dispatch", "gather", "ragged") in run_config.changes(
      old, run_config.as_dict(new)
  )


# --- kill -9 ----------------------------------------------------------------

_STEPS = 12
_ARGS = [
    "--config=configs/base.py:tiny",
    "--config.model.depth=2",
    "--config.model.decoder_depth=1",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=4",
    "--config.train.keep_checkpoints=10",
    "--config.train.eval_every=0",
    "--config.train.eval_examples=8",
    "--config.train.eval_batch_size=8",
    "--config.train.viz=False",
    "--config.data.num_tokenizer_captions=500",
    f"--config.train.steps={_STEPS}",
]


def _checkpoints(wd):
  """The finished checkpoint steps (orbax writes into a temporary folder
  and renames it when done)."""
  d = os.path.join(wd, "checkpoints")
  return (
      sorted(int(n) for n in os.listdir(d) if n.isdigit())
      if (os.path.isdir(d))
      else []
  )


def test_kill_9_anywhere_then_resume_is_bitwise_the_run_that_never_died(
    tmp_path,
):
  """The same command run straight to step 12, and killed with SIGKILL at a
  random step, then again in the middle of writing its step-8 checkpoint,
  then resumed to 12: the same losses at every logged step (repeated steps
  included) and bitwise the same final parameters."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # One compiled program for all four processes (and less compile time).
  env.update(
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )

  def run(wd, *, driver=(), check=True):
    cmd = [
        sys.executable,
        *(driver or ["-m", "eve_jax.main"]),
        *_ARGS,
        f"--workdir={wd}",
    ]
    out = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
      assert out.returncode == 0, out.stderr[-3000:]
    return out

  ref, wd = str(tmp_path / "ref"), str(tmp_path / "w")
  run(ref)
  ref_loss = {r["step"]: r["loss"] for r in read_jsonl(f"{ref}/metrics.jsonl")}
  assert sorted(ref_loss) == list(range(1, _STEPS + 1))

  # 1. SIGKILL at a random step after the step-4 checkpoint.
  kill_at = random.Random().randint(5, 7)
  proc = subprocess.Popen(
      [sys.executable, "-m", "eve_jax.main", *_ARGS, f"--workdir={wd}"],
      cwd=REPO,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= kill_at:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"kill_at={kill_at}"
  killed_after = len(read_jsonl(metrics))
  assert killed_after < _STEPS

  # 2. Resumed, and killed while its step-8 checkpoint is being written.
  out = run(wd, driver=["tests/crash_driver.py", "8"], check=False)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert 8 not in _checkpoints(wd), "the kill came after the save finished"
  assert _checkpoints(wd) in ([4], [])

  # 3. Resumed to the end.
  run(wd)
  rows = read_jsonl(metrics)
  assert {r["step"] for r in rows} == set(range(1, _STEPS + 1))
  for r in rows:  # steps run twice after a kill logged the same loss twice
    assert r["loss"] == ref_loss[r["step"]], (r["step"], kill_at)
  assert len(rows) > _STEPS  # some steps did run twice
  assert _checkpoints(wd) == [4, 8, 12]
  pa = dict(_flatten(restore_params(ref, _STEPS)))
  pb = dict(_flatten(restore_params(wd, _STEPS)))
  assert pa.keys() == pb.keys() and len(pa) > 50
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_a_half_written_metrics_row_is_dropped_on_resume(tmp_path):
  from eve_jax.writers import MetricWriter  # pylint: disable=g-import-not-at-top

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  writer = MetricWriter(str(tmp_path))
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert read_jsonl(str(path)) == [
      {"step": 1, "loss": 2.0},
      {"step": 2, "loss": 1.5},
  ]
