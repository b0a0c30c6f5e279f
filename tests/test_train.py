"""The training loop: outputs, exact resume, errors, and real learning."""

import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eve_jax import config_lib, sharding, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**train_kw):
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.model.depth = 2
  c.model.decoder_depth = 1
  c.train.update(
      dict(
          steps=6,
          batch_size=8,
          log_every=1,
          eval_every=0,
          checkpoint_every=3,
          eval_examples=12,
          eval_batch_size=8,
      )
  )
  c.train.update(train_kw)
  c.data.num_tokenizer_captions = 500
  return c


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)["params"]


def test_outputs_and_bitwise_resume(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ev = trainer.run(micro_config(), a).eval
  for name in (
      "config.json",
      "metrics.jsonl",
      "eval.json",
      "tokenizer.model",
      "checkpoints",
      "tensorboard",
  ):
    assert os.path.exists(os.path.join(a, name)), name
  rows = read_jsonl(os.path.join(a, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in (
      "loss",
      "mlm_loss",
      "mim_loss",
      "aux_loss",
      "mlm_acc",
      "lr",
      "samples_per_s",
      "dropped_token_frac",
  ):
    assert all(np.isfinite(r[key]) for r in rows), key
  with open(os.path.join(a, "eval.json")) as f:
    assert json.load(f) == dict(ev, step=6)
  for key in (
      "mlm_acc",
      "mlm_acc_visual",
      "mlm_acc_visual_blank",
      "mim_loss",
      "mim_loss_baseline",
      "dropped_token_frac",
  ):
    assert key in ev
  # The software the run was made with, for whoever compares it later.
  (run,) = read_jsonl(os.path.join(a, "run.jsonl"))
  assert run["versions"]["jax"] == jax.__version__
  assert run["versions"]["python"] == platform.python_version()

  # Pretend run b was stopped right after its step-3 checkpoint.
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "6"))
  with open(os.path.join(b, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:3])
  trainer.run(micro_config(), b)
  rows_b = read_jsonl(os.path.join(b, "metrics.jsonl"))
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(rows[3:], rows_b[3:]):
    for key in ("loss", "mlm_loss", "mim_loss", "grad_norm", "lr"):
      assert ra[key] == rb[key], (ra["step"], key)
  pa, pb = restore_params(a, 6), restore_params(b, 6)
  flat_a = dict(_flatten(pa))
  flat_b = dict(_flatten(pb))
  assert flat_a.keys() == flat_b.keys() and len(flat_a) > 50
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  # And a run that is already finished does nothing.
  trainer.run(micro_config(), b)
  assert len(read_jsonl(os.path.join(b, "metrics.jsonl"))) == 6


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


def _main(*args, cwd=REPO, timeout=600):
  """Runs the CLI as a user would: one CPU device, not the tests' 8 fake ones."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, "-m", "eve_jax.main", *args],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
  )


@pytest.mark.parametrize("config", ["configs/base.py", "configs/large.py"])
def test_real_corpora_configs_stop_with_one_line(tmp_path, config):
  """No --config.data.dir, or one without the corpora: one line naming the
  directory and the command that prepares them; nothing written."""
  out = _main(f"--config={config}", f"--workdir={tmp_path}/w")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("eve_jax: error:") and "config.data.dir" in last
  assert "configs/base.py:tiny" in last
  assert "Traceback" not in out.stderr
  os.makedirs(tmp_path / "data")
  out = _main(
      f"--config={config}",
      f"--workdir={tmp_path}/w",
      f"--config.data.dir={tmp_path}/data",
  )
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert (
      f"no prepared corpus 'coco' at {tmp_path}/data/coco" in last
      and "python -m eve_jax.data.prepare coco" in last
  ), last
  assert not os.path.exists(tmp_path / "w")


def test_config_typo_is_one_line(tmp_path):
  out = _main(
      "--config=configs/base.py:tiny",
      f"--workdir={tmp_path}/w",
      "--config.train.stpes=3",
  )
  assert out.returncode != 0
  assert "stpes" in out.stderr.strip().splitlines()[-1]
  assert "Traceback" not in out.stderr
  out = _main(
      "--config=configs/base.py:tiny",
      f"--workdir={tmp_path}/w",
      "--config.model.variant=huge",
  )
  assert out.returncode == 1 and "huge" in out.stderr.strip().splitlines()[-1]
  # A value of the wrong type, a config file that is not there, a bad arg:
  # exactly one line each, naming what is wrong.
  for args, words in (
      (
          ["--config=configs/base.py:tiny", "--config.train.steps=abc"],
          ("--config.train.steps=abc", "int"),
      ),
      (["--config=configs/nope.py"], ("configs/nope.py", "No such file")),
      (["--config=configs/base.py:tinyy"], ("unknown variant 'tinyy'",)),
      # A key this config lacks, with nothing close to suggest.
      (
          ["--config=configs/vqa.py:tiny", "--config.train.eval_examples=8"],
          ("--config.train.eval_examples", "no key 'train.eval_examples'"),
      ),
  ):
    out = _main(*args, f"--workdir={tmp_path}/w")
    assert out.returncode == 1, args
    assert out.stderr.startswith("eve_jax: error: "), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert all(w in out.stderr for w in words), out.stderr
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow  # ~30 s of training
def test_config_runs_from_another_directory(tmp_path):
  out = _main(
      f"--config={REPO}/configs/base.py:tiny",
      f"--workdir={tmp_path}/w",
      "--config.train.steps=1",
      "--config.train.batch_size=4",
      "--config.train.eval_examples=4",
      "--config.train.eval_batch_size=4",
      "--config.model.depth=1",
      "--config.model.num_soft_layers=1",
      "--config.model.decoder_depth=1",
      cwd=str(tmp_path),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert read_jsonl(f"{tmp_path}/w/metrics.jsonl")[-1]["step"] == 1


@pytest.mark.slow
def test_base_variant_one_step(tmp_path):
  """EVE-Base itself (12 x 768, 32 experts) builds and trains one step at
  batch 2 on the CPU, and reports its parameter counts."""
  c = micro_config(steps=1, batch_size=2, eval_examples=2, eval_batch_size=2)
  c.model = config_lib.model_config("base", vocab_size=64, max_text_len=18)
  c.mesh.data = 1  # one device: batch 2 does not split 8 ways
  trainer.run(
      c, str(tmp_path), sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  )
  run = read_jsonl(os.path.join(tmp_path, "run.jsonl"))[0]
  from test_model import expected_counts  # pylint: disable=g-import-not-at-top
  from eve_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  vocab = Tokenizer(os.path.join(tmp_path, "tokenizer.model")).vocab_size
  total, backbone, per_token = expected_counts("base", vocab=vocab)
  assert (
      run["params_total"],
      run["params_backbone"],
      run["params_backbone_per_token"],
  ) == (total, backbone, per_token)
  row = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]
  assert row["step"] == 1 and np.isfinite(row["loss"])


def test_tiny_pretraining_learns_to_use_the_image(tiny_workdir):
  """README's run: `configs/base.py:tiny`, unchanged, from the command line
  (the `tiny_workdir` fixture).

  Proof of learning by measured accuracy on held-out EVE-Shapes: masked
  color and shape words are predicted from the image (and not without it),
  and masked patches are reconstructed far better than a per-image mean.
  """
  with open(os.path.join(tiny_workdir, "eval.json")) as f:
    ev = json.load(f)
  print(json.dumps(ev, indent=1))
  assert ev["mlm_acc_visual"] >= 0.75, ev
  assert ev["mlm_acc_visual_blank"] <= 0.5 * ev["mlm_acc_visual"], ev
  assert ev["mim_loss"] <= 0.7 * ev["mim_loss_baseline"], ev
  assert ev["num_masked_visual_words"] >= 500, ev


def test_tiny_text_length_fits_the_longest_caption(tmp_path):
  """max_text_len 17 = CLS + the 16 words of a three-object caption: nothing
  of an EVE-Shapes caption is ever truncated."""
  from eve_jax.data import shapes
  from eve_jax.data.tokenizer import shapes_tokenizer

  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  tok = shapes_tokenizer(
      str(tmp_path / "t.model"), vocab_size=64, num_captions=500
  )
  longest = max(
      (shapes.generate_caption(0, i) for i in range(500)),
      key=lambda s: len(s.split()),
  )
  assert len(longest.split()) == 16
  assert 1 + len(tok.encode(longest)) == c.model.max_text_len


def test_sigterm_saves_a_checkpoint_and_exits_0_then_resumes(tmp_path):
  """A preempted run: SIGTERM mid-training -> the step finishes, a
  checkpoint at that step, exit code 0; the same command resumes there."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  wd = str(tmp_path / "w")
  args = [
      "--config=configs/base.py:tiny",
      f"--workdir={wd}",
      "--config.model.depth=2",
      "--config.model.decoder_depth=1",
      "--config.train.batch_size=8",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=0",
      "--config.train.eval_every=0",
      "--config.train.eval_examples=8",
      "--config.train.eval_batch_size=8",
      "--config.data.num_tokenizer_captions=500",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "eve_jax.main",
          *args,
          "--config.train.steps=100000",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read()[-2000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  rows = read_jsonl(metrics)
  stopped = rows[-1]["step"]
  assert 3 <= stopped < 100000
  assert "stopped at step" in err
  assert sorted(
      int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()
  ) == [stopped]
  out = _main(*args, f"--config.train.steps={stopped + 2}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"at step {stopped}" in out.stderr  # "resumed from ... at step N"
  assert [r["step"] for r in read_jsonl(metrics)][-2:] == [
      stopped + 1,
      stopped + 2,
  ]
