"""Test setup: 8 fake CPU devices before JAX starts (see STYLE.md)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory):
  """A 2-step pretraining run of a 1-block model (a soft-router block) with
  MLM, MIM and ITC, on one device, and one evaluation (so DIR/viz/ too):
  what the viz and predict tests load. Its weights are barely trained:
  tests on it check plumbing, not quality."""
  import jax  # pylint: disable=g-import-not-at-top
  from eve_jax import config_lib, sharding, train  # pylint: disable=g-import-not-at-top
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.objectives = "mlm,mim,itc"
  c.model.update(dict(depth=1, num_soft_layers=1, decoder_depth=1))
  c.data.num_tokenizer_captions = 500
  c.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=2,
                      checkpoint_every=2, eval_examples=8,
                      eval_batch_size=8))
  c.mesh.data = 1  # one device: compiles in half the time of 8 fake ones
  d = str(tmp_path_factory.mktemp("micro_pretrain"))
  train.run(c, d, sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
  return d


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """`configs/base.py:tiny` trained as README says (about 5.5 minutes on 2
  CPU cores; slow tests only), or the finished run EVE_JAX_TINY_WORKDIR
  names."""
  d = os.environ.get("EVE_JAX_TINY_WORKDIR")
  if d:
    return d
  from eve_jax import config_lib, train  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp("tiny"))
  train.run(config_lib.get_pretrain_config("tiny", default_variant="base"),
            d)
  return d
