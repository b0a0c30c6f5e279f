"""Gradient accumulation (eve_jax/accum.py): K microbatches equal one batch.

The reference is the step as it has always run, on the whole batch (K = 1):
the same loss, every gradient and the updated parameters from K = 4
microbatches of 8 rows as from one batch of 32.
"""

import json
import re
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax import accum, config_lib, sharding, train
from eve_jax.aot import build
from eve_jax.model import batch_random


def _config(**train_keys):
  """A 2-block EVE (a hard-router and a soft-router block) with every
  random draw of a step switched on (drop path, BERT's replacements)
  and a capacity that drops assignments."""
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.model.update(
      dict(
          depth=2,
          decoder_depth=1,
          num_soft_layers=1,
          drop_path=0.1,
          capacity_factor=0.75,
      )
  )
  c.masking.mlm_random_replace = True
  c.data.num_tokenizer_captions = 500
  c.train.update(dict(batch_size=32, **train_keys))
  c.mesh.data = 1
  return c


def _one_device():
  return sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])


def test_draws_in_a_microbatch_are_its_rows_of_the_whole_batch():
  """Microbatch k of K takes rows k, K + k, ... of the batch's draw; a
  draw over 2 rows per example (NLVR2's paired pass) takes each
  example's two rows."""
  rng = jax.random.key(3)
  whole = np.asarray(batch_random.uniform(rng, (12, 5)))
  pairs = np.asarray(batch_random.bernoulli(rng, 0.5, (24, 1)))
  ints = np.asarray(batch_random.randint(rng, (12, 5), 4, 60))
  for k in range(3):
    with batch_random.microbatch(jnp.int32(k), 3, 4):
      mine = np.asarray(batch_random.uniform(rng, (4, 5)))
      mine_pairs = np.asarray(batch_random.bernoulli(rng, 0.5, (8, 1)))
      mine_ints = np.asarray(batch_random.randint(rng, (4, 5), 4, 60))
      with pytest.raises(ValueError, match="rows per example"):
        batch_random.uniform(rng, (6, 5))
    np.testing.assert_array_equal(mine, whole[k::3])
    np.testing.assert_array_equal(mine_ints, ints[k::3])
    examples = pairs.reshape(12, 2)[k::3]
    np.testing.assert_array_equal(mine_pairs.reshape(4, 2), examples)
  # Outside a microbatch: jax.random's own draw, as before accumulation.
  np.testing.assert_array_equal(whole, jax.random.uniform(rng, (12, 5)))


def _loss_and_grads(config, tokenizer, batch, count):
  """((loss, metrics), grads) of the pretraining loss at the initial
  parameters over `count` microbatches (1: the plain value_and_grad)."""
  task = train.Pretraining(config, tokenizer)
  model = task.build_model(nnx.Rngs(params=jax.random.key(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = jax.random.key(7)

  def loss_fn(p, b):
    return task.loss(nnx.merge(graphdef, p), b, rng)

  @jax.jit
  def run(params, batch):
    if count == 1:
      return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return accum.loss_and_grads(
        loss_fn, params, batch, count, task.loss_weights(batch)
    )

  return run(params, batch)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_four_microbatches_of_8_equal_one_batch_of_32(tokenizer):
  """Loss, metrics and every gradient, float32, the default router
  (moe_group=sample), eq. 7's weight 0 (a batch-level product: its
  accumulation is the microbatches' mean, below)."""
  config = _config()
  config.model.aux_loss_weight = 0.0
  task = train.Pretraining(config, tokenizer)
  batch = next(task.train_batches((0, 1)))
  batch = {k: jnp.asarray(batch[k]) for k in ("image", "text", "text_valid")}
  # Texts of different lengths: MLM's masked tokens differ per microbatch,
  # so equal weights would not give the batch's MLM loss.
  counts = np.asarray(task.loss_weights(batch)["mlm_loss"]).reshape(8, 4)
  assert len(set(counts.sum(0))) > 1
  (l1, m1), g1 = _loss_and_grads(config, tokenizer, batch, 1)
  (l4, m4), g4 = _loss_and_grads(config, tokenizer, batch, 4)
  assert float(m1["mlm_loss"]) > 0 and float(m1["mim_loss"]) > 0
  assert _rel(l4, l1) < 1e-6
  for name in ("mlm_loss", "mlm_acc", "mim_loss", "dropped_token_frac"):
    assert _rel(m4[name], m1[name]) < 1e-6, name
  assert float(m1["dropped_token_frac"]) > 0
  worst = max(
      _rel(a, b) for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1))
  )
  assert worst < 1e-6, worst


def test_nlvr2_in_microbatches_equals_the_whole_batch():
  """Fine-tuning too: NLVR2's paired pass (each example's two images side
  by side, drop path drawn over 2 rows per example), K = 2 x 4 against
  one batch of 8, random inputs."""
  from eve_jax.tasks.nlvr2 import NLVR2Task  # pylint: disable=g-import-not-at-top

  config = config_lib.from_file("nlvr2", "tiny")
  config.model.update(
      dict(depth=2, num_soft_layers=1, drop_path=0.2, aux_loss_weight=0.0)
  )
  task = NLVR2Task.for_compile(config, build.VocabOnly(64))
  model = task.build_model(nnx.Rngs(params=jax.random.key(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  batch = {}
  for name, (shape, dtype) in task.batch_spec(8).items():
    if np.dtype(dtype) == np.bool_:  # text_valid: 3 to L real tokens
      length = rng.integers(3, shape[-1], (shape[0], 1))
      batch[name] = jnp.asarray(np.arange(shape[-1]) < length)
    elif np.issubdtype(dtype, np.integer):
      high = 2 if name == "label" else 64
      batch[name] = jnp.asarray(rng.integers(0, high, shape), dtype)
    else:
      batch[name] = jnp.asarray(rng.standard_normal(shape), dtype)

  def loss_fn(p, b):
    return task.loss(nnx.merge(graphdef, p), b, jax.random.key(5))

  whole = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
  parts = jax.jit(lambda p, b: accum.loss_and_grads(loss_fn, p, b, 2, {}))(
      params, batch
  )
  (l1, m1), g1 = whole
  (l2, m2), g2 = parts
  assert _rel(l2, l1) < 1e-6
  assert _rel(m2["nlvr2_train_acc"], m1["nlvr2_train_acc"]) < 1e-6
  worst = max(
      _rel(a, b) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1))
  )
  # 1e-5, not 1e-6: the classifier's output bias gets the sum over 8
  # examples of nearly cancelling terms (2.8e-6 measured; every other
  # leaf under 1e-6), float32 rounding that a sum in another order shows.
  assert worst < 1e-5, worst


def _collective_kinds(hlo: str) -> dict[str, int]:
  kinds = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
  return {k: len(re.findall(rf"\s{k}(-start)?\(", hlo)) for k in kinds}


def test_the_step_over_4_devices_with_microbatches_updates_as_without(
    tokenizer,
):
  """The compiled, donated train step on data=4, one AdamW update from
  K = 2 and K = 1 (the default aux weight): the parameters agree, the
  logged loss differs by eq. 7's term alone, and the microbatches stay
  on their devices (no collective that K = 1 does not have)."""
  out = {}
  for k in (1, 2):
    config = _config(grad_accum_steps=k)
    config.mesh.data = 4
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
    rules = sharding.parse_rules(config.axis_rules)
    with sharding.use(mesh, rules):
      prog = train.build_program(config, tokenizer, mesh, rules)
      task = train.Pretraining(config, tokenizer)
      local = next(task.train_batches((0, 1)))
      batch = {
          n: jax.device_put(local[n], prog.train.batch_sharding)
          for n in prog.train.batch
      }
      compiled = prog.train.lower(mesh, rules).compile()
      state = prog.init(prog.init_rng)
      state, metrics = compiled(state, batch)
    kinds = _collective_kinds(compiled.as_text())
    out[k] = (jax.device_get(state.params), jax.device_get(metrics), kinds)
  (p1, m1, c1), (p2, m2, c2) = out[1], out[2]
  assert "moe_assignments" not in m1 and "moe_assignments" not in m2
  for name in ("mlm_loss", "mlm_acc", "mim_loss", "dropped_token_frac"):
    assert _rel(m2[name], m1[name]) < 1e-6, name
  np.testing.assert_allclose(
      m2["loss"] - m2["aux_loss"], m1["loss"] - m1["aux_loss"], rtol=1e-6
  )
  # eq. 7 from microbatches of 16: close to the batch's, not equal.
  assert abs(m2["aux_loss"] - m1["aux_loss"]) < 0.1 * m1["aux_loss"]
  worst = max(
      _rel(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1))
  )
  assert worst < 1e-6, worst
  for kind in ("all-gather", "all-to-all", "collective-permute"):
    assert c2[kind] <= c1[kind], (kind, c1, c2)


def test_a_k_that_does_not_divide_the_device_batch_is_one_line(tokenizer):
  config = _config(grad_accum_steps=3)
  mesh = _one_device()
  rules = sharding.parse_rules(config.axis_rules)
  with pytest.raises(ValueError, match=r"grad_accum_steps=3 does not divide"):
    train.build_program(config, tokenizer, mesh, rules)
  config.train.grad_accum_steps = 0
  with pytest.raises(ValueError, match="an integer >= 1"):
    train.build_program(config, tokenizer, mesh, rules)


def test_in_batch_negatives_refuse_microbatches(tmp_path):
  config = _config(grad_accum_steps=2)
  config.objectives = "mlm,itc"
  with pytest.raises(ValueError, match="objective itc uses the whole batch"):
    train.Pretraining.check(config, str(tmp_path))


@pytest.mark.slow
def test_a_run_resumed_with_another_k_continues_as_the_run_that_kept_k(
    tmp_path,
):
  """The trainer, one device: 4 steps at K = 1 against 2 steps at K = 1
  resumed for 2 more at K = 2 (run_config lets K change). eq. 7's weight
  is 0 here: with it, accumulation averages the microbatches' balance
  losses (eve_jax/accum.py) and the runs part by that term's gradient."""
  from eve_jax import trainer  # pylint: disable=g-import-not-at-top
  from test_train import read_jsonl  # pylint: disable=g-import-not-at-top

  def run(workdir, steps, k):
    c = _config(
        grad_accum_steps=k,
        steps=steps,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
        eval_examples=16,
        eval_batch_size=16,
        viz=False,
    )
    c.model.aux_loss_weight = 0.0
    c.train.batch_size = 16
    trainer.run(c, str(workdir), _one_device())
    return {r["step"]: r for r in read_jsonl(f"{workdir}/metrics.jsonl")}

  kept = run(tmp_path / "kept", 4, 1)
  # The same run stopped after its step-2 checkpoint (as a preempted one
  # is), resumed at K = 2.
  shutil.copytree(tmp_path / "kept", tmp_path / "changed")
  shutil.rmtree(tmp_path / "changed" / "checkpoints" / "4")
  rows = read_jsonl(tmp_path / "changed" / "metrics.jsonl")
  with open(tmp_path / "changed" / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= 2)
  changed = run(tmp_path / "changed", 4, 2)
  assert (tmp_path / "changed" / "checkpoints" / "4").exists()
  assert sorted(kept) == sorted(changed) == [1, 2, 3, 4]
  for step in (3, 4):
    for key in ("loss", "mlm_loss", "mlm_acc", "mim_loss", "grad_norm"):
      np.testing.assert_allclose(
          changed[step][key],
          kept[step][key],
          rtol=1e-5,
          err_msg=f"{key}@{step}",
      )
    assert changed[step]["dropped_token_frac"] == pytest.approx(
        kept[step]["dropped_token_frac"], abs=1e-6
    )
