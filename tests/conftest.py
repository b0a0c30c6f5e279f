"""Test setup: 8 fake CPU devices before JAX starts (see STYLE.md)."""

import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The compile-only TPU targets (tests/test_compile.py) load libtpu, which
# takes a lock file: without this a second process on the machine (another
# test session, `python -m eve_jax.compile`) makes those tests skip.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  """An EVE-Shapes tokenizer of 64 pieces (a module may define its own)."""
  from eve_jax.data.tokenizer import shapes_tokenizer  # pylint: disable=g-import-not-at-top

  return shapes_tokenizer(
      str(tmp_path_factory.mktemp("tok") / "t.model"),
      vocab_size=64,
      num_captions=500,
  )


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory):
  """A 2-step pretraining run of a 1-block model (a soft-router block) with
  MLM, MIM and ITC, on one device, and one evaluation (so DIR/viz/ too):
  what the viz and predict tests load. Its weights are barely trained:
  tests on it check plumbing, not quality."""
  import jax  # pylint: disable=g-import-not-at-top
  from eve_jax import config_lib, sharding, trainer  # pylint: disable=g-import-not-at-top

  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.objectives = "mlm,mim,itc"
  c.model.update(dict(depth=1, num_soft_layers=1, decoder_depth=1))
  c.data.num_tokenizer_captions = 500
  c.train.update(
      dict(
          steps=2,
          batch_size=8,
          log_every=1,
          eval_every=2,
          checkpoint_every=2,
          eval_examples=8,
          eval_batch_size=8,
      )
  )
  c.mesh.data = 1  # one device: compiles in half the time of 8 fake ones
  d = str(tmp_path_factory.mktemp("micro_pretrain"))
  trainer.run(c, d, sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
  return d


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """README's first command, `configs/base.py:tiny` unchanged, run once per
  session from the command line on one CPU device (about 5.5 minutes on 2
  cores): test_train checks what it learned, test_viz and test_predict its
  pictures, heat maps and predictions. EVE_JAX_TINY_WORKDIR names a
  finished run to check instead."""
  d = os.environ.get("EVE_JAX_TINY_WORKDIR")
  if d:
    return d
  d = str(tmp_path_factory.mktemp("tiny") / "w")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.main",
          "--config=configs/base.py:tiny",
          f"--workdir={d}",
      ],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True,
      text=True,
      timeout=1500,
      env=env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return d
