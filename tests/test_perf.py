"""Speed work that must not change results, FLOP accounting, the benchmark,
and the ITC/ITM objectives of the Table 1 comparison."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax import config_lib, flops
from eve_jax.model import eve
from eve_jax.model.attention import Attention
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.moe import ModalityMoE
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.variants import ModelConfig
from eve_jax.model import passes
from eve_jax.tasks import losses, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _moe_inputs(batch, length, dim, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, length, dim))
  modality = (jnp.arange(length) >= length // 2).astype(jnp.int32)
  modality = jnp.broadcast_to(modality, (batch, length))
  valid = jax.random.bernoulli(k2, 0.9, (batch, length))
  return x, modality, valid


def _moe_value_and_grad(layer):
  graphdef, params = nnx.split(layer)

  def loss(params, x, m, v):
    y, stats = nnx.merge(graphdef, params)(x, m, v)
    return jnp.sum(jnp.sin(y)) + stats.aux_loss, (y, stats.dropped)

  return jax.jit(jax.value_and_grad(loss, has_aux=True)), params


@pytest.mark.parametrize("capacity_factor", [1.0, 1.25, 0.0])
def test_dispatch_and_expert_forms_agree(capacity_factor):
  """Outputs, dropped counts and every gradient agree between the gather
  and the one-hot einsum dispatch, and between unrolled and batched
  experts (with and without dropping)."""
  x, m, v = _moe_inputs(3, 24, 16)
  outs = {}
  for dispatch, experts in (
      ("einsum", "batched"),
      ("gather", "batched"),
      ("gather", "unrolled"),
  ):
    layer = ModalityMoE(
        16,
        32,
        MoEConfig(
            8,
            2,
            capacity_factor=capacity_factor,
            dispatch=dispatch,
            experts=experts,
        ),
        rngs=nnx.Rngs(1),
    )
    fn, params = _moe_value_and_grad(layer)
    outs[dispatch, experts] = fn(params, x, m, v)
  (_, (y_ref, drop_ref)), g_ref = outs["einsum", "batched"]
  if capacity_factor == 1.0:
    assert float(drop_ref) > 0
  for key in (("gather", "batched"), ("gather", "unrolled")):
    (_, (y, dropped)), grads = outs[key]
    assert float(dropped) == float(drop_ref)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6, err_msg=str(key)
    )
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(key)
      )


def _layer_train_flops(dispatch, experts="batched"):
  """XLA's FLOPs for forward + backward of EVE-Base's soft-MoE layer over
  two MLM-pass sequences (1 + 196 image + 40 text tokens)."""
  cfg = ModelConfig.from_config(config_lib.model_config("base"))
  length = 1 + cfg.num_patches + 40
  layer = nnx.eval_shape(
      lambda: ModalityMoE(
          cfg.width,
          cfg.mlp_dim,
          dataclasses.replace(cfg.moe, dispatch=dispatch, experts=experts),
          rngs=nnx.Rngs(0),
      )
  )
  graphdef, params = nnx.split(layer)
  x, m, v = _moe_inputs(2, length, cfg.width)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, m, v)
    return jnp.sum(y) + stats.aux_loss

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = 3 * 2 * flops.moe_layer(cfg, length)  # train = 3 x forward
  return float(cost["flops"]) / analytic


def test_base_soft_moe_layer_costs_close_to_its_active_flops():
  """flops_xla / flops_analytic <= 1.35 for the base soft-MoE layer at
  capacity factor 1.25 (C = 19 slots for 18.5 assignments per expert: 1.28
  of it is capacity padding), from the compiled HLO's cost analysis."""
  ratio = _layer_train_flops("gather")
  assert 1.0 <= ratio <= 1.35, ratio
  assert _layer_train_flops("gather", "unrolled") <= 1.35
  # The one-hot einsum pays 2 * S * E * C * D more each way: the check can
  # tell the two apart.
  assert _layer_train_flops("einsum") > ratio + 0.05


def test_fused_attention_equals_einsum_attention():
  """jax.nn.dot_product_attention (padded to a multiple of 8, with the key
  mask) gives the einsum reference's outputs and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 13, 32))
  valid = jnp.arange(13)[None, :] < jnp.array([[13], [9]])
  res = {}
  for impl in ("einsum", "xla"):
    attn = Attention(32, 4, impl=impl, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(attn)

    def f(params, x):
      return jnp.sum(jnp.tanh(nnx.merge(graphdef, params)(x, valid)))

    res[impl] = jax.value_and_grad(f, argnums=(0, 1))(params, x)
  (ve, ge), (vx, gx) = res["einsum"], res["xla"]
  np.testing.assert_allclose(float(ve), float(vx), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ge), jax.tree.leaves(gx)):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6
    )


def _tiny(**model):
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.model.update({**dict(depth=2, num_soft_layers=1, decoder_depth=1), **model})
  return ModelConfig.from_config(c.model, vocab_size=64)


def _task(objectives=("mlm", "mim")):
  return pretrain.PretrainTask(
      masking=pretrain.MaskingConfig(),
      mask_id=3,
      cls_id=2,
      vocab_size=64,
      num_special=4,
      objectives=tuple(objectives),
  )


def _batch(cfg, b=4, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  text = jax.random.randint(k1, (b, cfg.max_text_len), 4, 64)
  text = text.at[:, 0].set(2)
  valid = (
      jnp.arange(cfg.max_text_len)[None]
      < jnp.array([[17], [12], [9], [17]])[:b]
  )
  return {
      "image": jax.random.uniform(
          k2, (b, cfg.image_size, cfg.image_size, 3), minval=-1, maxval=1
      ),
      "text": jnp.where(valid, text, 0),
      "text_valid": valid,
  }


def _loss_and_grads(cfg, task, batch, with_metrics=False):
  model = EVEPretrainModel(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def f(params):
    return task.loss(nnx.merge(graphdef, params), batch, jax.random.key(1))

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return ((loss, metrics) if with_metrics else loss), grads


@pytest.mark.slow  # ~1.3 min; test_sharding and test_model cover scan
def test_remat_and_scanned_layers_change_nothing_but_memory_and_layout():
  """remat recomputes activations; scan_layers stacks the hard-router
  blocks and runs them with nnx.scan. Alone or together: the same initial
  values, loss and gradients as the plain unrolled model, with drop path on
  so each scanned layer's own rate and key count."""

  def cfg(**kw):
    return _tiny(depth=4, num_soft_layers=1, drop_path=0.3, **kw)

  plain = cfg()
  assert eve.num_scanned(cfg(scan_layers=True)) == 3
  batch = _batch(plain)
  v0, g0 = _loss_and_grads(plain, _task(), batch)
  init0 = nnx.to_pure_dict(
      nnx.state(EVEPretrainModel(plain, rngs=nnx.Rngs(0)), nnx.Param)
  )
  for kw in (
      dict(remat=True),
      dict(scan_layers=True),
      dict(scan_layers=True, remat=True),
  ):
    c = cfg(**kw)
    v1, g1 = _loss_and_grads(c, _task(), batch)
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6, err_msg=kw)
    init1 = nnx.to_pure_dict(
        nnx.state(EVEPretrainModel(c, rngs=nnx.Rngs(0)), nnx.Param)
    )
    for want, got in (
        (init0, init1),
        (nnx.to_pure_dict(g0), nnx.to_pure_dict(g1)),
    ):
      if c.scan_layers:
        assert got["backbone"]["scanned"]["ffn"]["wi"].shape == (
            3,
            2,
            plain.width,
            plain.mlp_dim,
        )
        want = dict(want, backbone=eve.scan_layout(want["backbone"], plain))
      assert jax.tree.structure(want) == jax.tree.structure(got)
      for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7, err_msg=str(kw)
        )
  back = eve.unscan_layout(eve.scan_layout(init0["backbone"], plain), plain)
  assert jax.tree.structure(back) == jax.tree.structure(init0["backbone"])
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(init0["backbone"])):
    np.testing.assert_array_equal(x, y)


def test_bfloat16_compute_keeps_float32_parameters():
  """bf16 matmuls, float32 parameters, gradients and loss; the loss within
  2% of the float32 one."""
  batch = _batch(_tiny())
  v32, _ = _loss_and_grads(_tiny(), _task(), batch)
  v16, g16 = _loss_and_grads(_tiny(dtype="bfloat16"), _task(), batch)
  assert v16.dtype == jnp.float32
  assert {g.dtype for g in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
  assert abs(float(v16) - float(v32)) <= 0.02 * abs(float(v32))


def test_dense_comparison_model_has_the_same_active_flops():
  """soft_ffn="dense": each soft-router layer becomes one FFN of top_k *
  mlp_dim hidden units, i.e. the MoE's active FLOPs minus the router."""
  moe, dense = _tiny(), _tiny(soft_ffn="dense")
  length = 1 + moe.num_patches + moe.max_text_len
  router = flops.mm(length, moe.width, moe.num_experts)
  assert flops.encoder(
      moe, 1 + moe.num_patches, moe.max_text_len
  ) - router == flops.encoder(dense, 1 + moe.num_patches, moe.max_text_len)
  model = nnx.eval_shape(lambda: EVEPretrainModel(dense, rngs=nnx.Rngs(0)))
  wi = model.backbone.blocks[1].ffn.fc1.kernel
  assert wi.shape == (dense.width, dense.top_k * dense.mlp_dim)


def test_analytic_flops_by_hand():
  """A 1-layer, hard-router-only model small enough to count by hand."""
  cfg = ModelConfig(
      depth=1,
      width=8,
      heads=2,
      mlp_dim=16,
      num_soft_layers=0,
      num_experts=2,
      decoder_width=4,
      decoder_depth=1,
      decoder_heads=1,
      image_size=8,
      patch_size=4,
      vocab_size=10,
      max_text_len=3,
  )
  li, lt = 5, 3  # CLS + 4 patches, 3 text tokens
  length = li + lt
  enc = (
      4 * 2 * length * 8 * 8
      + 2 * 2 * length * length * 8
      + 2 * 2 * length * 8 * 16
  )
  assert flops.encoder(cfg, li, lt) == enc
  embed = 2 * 4 * 48 * 8
  head = 2 * lt * 8 * 8 + 2 * lt * 8 * 10
  assert (
      flops.train_flops_per_sample(cfg, ("mlm",))["mlm"]
      == 3 * (enc + head) + 2 * embed
  )


def test_contrastive_loss_by_hand():
  sims = jnp.array([[2.0, 0.0], [1.0, 3.0]])
  # rows: -log softmax at the diagonal; columns likewise.
  row = -np.log(np.exp(2) / (np.exp(2) + 1)) - np.log(
      np.exp(3) / (np.exp(1) + np.exp(3))
  )
  col = -np.log(np.exp(2) / (np.exp(2) + np.exp(1))) - np.log(
      np.exp(3) / (1 + np.exp(3))
  )
  np.testing.assert_allclose(
      float(losses.contrastive_loss(sims)), (row / 2 + col / 2) / 2, rtol=1e-6
  )


def test_hard_negatives_follow_the_similarities():
  """Never the true partner; drawn in proportion to exp(similarity)."""
  sims = jnp.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
  draws = jax.vmap(lambda k: jnp.stack(passes.hard_negatives(k, sims)))(
      jax.random.split(jax.random.key(0), 4000)
  )
  neg_image, neg_text = np.asarray(draws[:, 0]), np.asarray(draws[:, 1])
  for i in range(3):
    assert not np.any(neg_image[:, i] == i) and not np.any(neg_text[:, i] == i)
  # Text 0's negative image: images 1, 2 with weights exp(1), exp(0).
  p1 = np.exp(1) / (np.exp(1) + 1)
  assert abs(np.mean(neg_image[:, 0] == 1) - p1) < 0.03
  # Image 0's negative text: texts 1, 2 with weights exp(2), exp(0).
  q1 = np.exp(2) / (np.exp(2) + 1)
  assert abs(np.mean(neg_text[:, 0] == 1) - q1) < 0.03


def test_itc_itm_objectives_train_their_heads():
  cfg = _tiny(matching_heads=True)
  batch = _batch(cfg)
  task = _task(("mlm", "itc", "itm"))
  (loss, metrics), grads = _loss_and_grads(cfg, task, batch, True)
  assert set(metrics) >= {"mlm_loss", "itc_loss", "itm_loss", "itm_acc"}
  assert "mim_loss" not in metrics
  parts = metrics["mlm_loss"] + metrics["itc_loss"] + metrics["itm_loss"]
  np.testing.assert_allclose(
      float(loss), float(parts + metrics["aux_loss"]), rtol=1e-6
  )
  # At initialization ITC is near log(B) and ITM near log(2).
  assert abs(float(metrics["itc_loss"]) - np.log(4)) < 0.5
  assert abs(float(metrics["itm_loss"]) - np.log(2)) < 0.3
  for name in ("image_proj", "text_proj", "itm"):
    assert float(jnp.abs(grads["matching"][name]["kernel"][...]).sum()) > 0
  assert float(jnp.abs(grads["matching"]["temp"][...])) > 0


@pytest.mark.parametrize(
    "objectives,words",
    [
        (("mlm", "itm"), "add itc"),
        (("mlm", "nsp"), "subset of mlm"),
        ((), "non-empty"),
    ],
)
def test_bad_objectives_are_named(objectives, words):
  with pytest.raises(ValueError, match=words):
    _task(objectives)


@pytest.mark.slow  # ~2 min: the benchmark CLI end to end
def test_bench_json(tmp_path):
  """The benchmark's JSON has every documented key with sane values."""
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.bench",
          "--config=configs/base.py:tiny",
          "--config.model.depth=2",
          "--config.model.decoder_depth=1",
          "--steps=2",
          "--warmup=1",
          "--batch_size=8",
          "--compare=dense",
          "--compare=objectives",
          "--compare=accum",
          "--matmul_size=512",
          "--json",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  for key in (
      "device",
      "dtype",
      "batch",
      "step_s",
      "samples_per_s",
      "flops_per_sample_analytic",
      "flops_per_sample_xla",
      "peak_flops",
      "mfu",
      "compile_s",
      "peak_memory_bytes",
      "dropped_token_frac",
      "moe_step_over_dense",
      "objectives_samples_per_s",
      "mlm_mim_over_mlm_itc_itm",
      "accum_step_over_whole",
  ):
    assert key in r, key
  a = r["accum"]
  assert a["grad_accum_steps"] == 4
  assert r["accum_step_over_whole"] == pytest.approx(
      a["accum_step_s"] / a["whole_step_s"]
  )
  # Microbatches of 2 hold less than the whole batch of 8 at once.
  assert a["accum_peak_memory_bytes"] < a["whole_peak_memory_bytes"]
  assert r["batch"] == 8 and r["dtype"] == "float32"
  assert r["samples_per_s"] == pytest.approx(8 / r["step_s"])
  assert r["mfu"] == pytest.approx(
      r["samples_per_s"] * r["flops_per_sample_analytic"] / r["peak_flops"]
  )
  assert 0 < r["mfu"] < 1 and r["peak_memory_bytes"] > 0
  assert 0.9 < r["flops_per_sample_xla"] / r["flops_per_sample_analytic"] < 2
  assert set(r["objectives_samples_per_s"]) == {
      "mlm,mim",
      "mlm,itc,itm",
      "mlm,mim,itc,itm",
  }
