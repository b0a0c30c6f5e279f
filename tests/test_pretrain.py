"""Masked signal modeling: masks, losses and the evaluation numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.variants import VARIANTS, ModelConfig
from eve_jax.tasks import pretrain
from eve_jax.tasks.pretrain import MaskingConfig, PretrainTask

CLS, MASK, PAD = 2, 3, 0


@pytest.mark.parametrize("ratio", [0.5, 0.15, 0.75])
def test_text_mask_exact_count_never_cls_or_pad(ratio):
  rng = np.random.default_rng(0)
  b, l = 64, 40
  lengths = rng.integers(1, l + 1, b)  # 1 = CLS only: nothing to mask
  valid = np.arange(l)[None] < lengths[:, None]
  text = np.where(valid, rng.integers(4, 100, (b, l)), PAD)
  text[:, 0] = CLS
  maskable = valid & (text != CLS)
  mask = np.asarray(
      pretrain.random_text_mask(jax.random.key(1), jnp.asarray(maskable), ratio)
  )
  n = maskable.sum(1)
  np.testing.assert_array_equal(mask.sum(1), np.floor(ratio * n + 0.5))
  assert not mask[:, 0].any()  # CLS
  assert not mask[~valid].any()  # padding
  # Different samples get different positions (per-sample randomness).
  full = lengths == l
  rows = {tuple(np.flatnonzero(m)) for m in mask[full]}
  assert len(rows) > 1


def test_text_mask_bert_replacement_split():
  b, l = 256, 40
  text = jnp.asarray(np.random.default_rng(1).integers(4, 1000, (b, l)))
  mask = jnp.ones((b, l), bool)
  out = np.asarray(
      pretrain.apply_text_mask(
          jax.random.key(2),
          text,
          mask,
          mask_id=MASK,
          vocab_size=1000,
          num_special=4,
          random_replace=True,
      )
  )
  frac_mask = (out == MASK).mean()
  frac_same = (out == np.asarray(text)).mean()
  assert abs(frac_mask - 0.8) < 0.02
  assert abs(frac_same - 0.1) < 0.02  # + ~0.1% random hits of itself
  assert (out >= 3).all()  # random tokens are never pad/unk/CLS
  plain = pretrain.apply_text_mask(
      jax.random.key(2),
      text,
      mask,
      mask_id=MASK,
      vocab_size=1000,
      num_special=4,
      random_replace=False,
  )
  assert (np.asarray(plain) == MASK).all()


@pytest.mark.parametrize(
    "n,ratio,keep",
    [(196, 0.75, 49), (64, 0.75, 16), (16, 0.75, 4), (10, 0.5, 5)],
)
def test_patch_mask_exact(n, ratio, keep):
  keep_idx, mask = pretrain.random_patch_keep(jax.random.key(3), 8, n, ratio)
  keep_idx, mask = np.asarray(keep_idx), np.asarray(mask)
  assert keep_idx.shape == (8, keep)
  assert (mask.sum(1) == n - keep).all()
  for row_idx, row_mask in zip(keep_idx, mask):
    assert len(set(row_idx)) == keep and (np.diff(row_idx) > 0).all()
    assert not row_mask[row_idx].any()
  assert len({tuple(r) for r in keep_idx}) > 1


def test_mlm_loss_and_acc_by_hand():
  # Two masked positions: one predicted right with p=0.5, one wrong.
  logits = jnp.log(
      jnp.asarray([[[0.5, 0.25, 0.25], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]])
  )
  targets = jnp.asarray([[0, 1, 2]])
  mask = jnp.asarray([[True, True, False]])
  loss, acc = pretrain.mlm_loss_and_acc(logits, targets, mask)
  np.testing.assert_allclose(loss, (-np.log(0.5) - np.log(0.3)) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)


def test_mim_baseline_and_norm_pix_targets():
  images = jnp.asarray(
      np.random.default_rng(4).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32
  )
  t = pretrain.patch_targets(images, 4, norm_pix=False)
  assert t.shape == (2, 4, 48)
  np.testing.assert_array_equal(
      np.asarray(t[0, 1]), np.asarray(images[0, :4, 4:8]).reshape(-1)
  )
  tn = np.asarray(pretrain.patch_targets(images, 4, norm_pix=True))
  np.testing.assert_allclose(tn.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(tn.std(-1), 1, atol=1e-3)


def _task_and_model(**model_kw):
  cfg = ModelConfig(
      **dict(
          dict(
              VARIANTS["tiny"],
              vocab_size=40,
              max_text_len=12,
              image_size=32,
              patch_size=4,
          ),
          **model_kw
      )
  )
  model = EVEPretrainModel(cfg, rngs=nnx.Rngs(params=0))
  task = PretrainTask(
      MaskingConfig(), mask_id=MASK, cls_id=CLS, vocab_size=40, num_special=4
  )
  return task, model


def _batch(b=4, l=12, seed=5):
  rng = np.random.default_rng(seed)
  valid = np.arange(l)[None] < rng.integers(4, l + 1, b)[:, None]
  text = np.where(valid, rng.integers(4, 40, (b, l)), PAD)
  text[:, 0] = CLS
  return dict(
      image=jnp.asarray(rng.uniform(-1, 1, (b, 32, 32, 3)), jnp.float32),
      text=jnp.asarray(text, jnp.int32),
      text_valid=jnp.asarray(valid),
  )


def test_loss_is_sum_of_parts_and_eval_matches_train_pass():
  task, model = _task_and_model()
  batch = _batch()
  loss, m = task.loss(model, batch, jax.random.key(0), train=False)
  np.testing.assert_allclose(
      loss, m["mlm_loss"] + m["mim_loss"] + m["aux_loss"], rtol=1e-6
  )
  # 2 soft layers x 2 passes, each ~alpha at init (near-uniform routing).
  assert 0.5 * 4e-3 < float(m["aux_loss"]) < 2 * 4e-3
  sums = pretrain.eval_sums(
      task,
      model,
      batch,
      jax.random.key(0),
      jnp.asarray([5, 6, 7]),
      jnp.zeros((32, 32, 3)),
  )
  ev = pretrain.eval_metrics(jax.device_get(sums))
  # Same rng -> same masks -> the eval MIM loss equals the train-pass one.
  np.testing.assert_allclose(ev["mim_loss"], float(m["mim_loss"]), rtol=1e-5)
  np.testing.assert_allclose(ev["mlm_acc"], float(m["mlm_acc"]), rtol=1e-5)


def test_eval_visual_words_and_padding_examples():
  task, model = _task_and_model()
  batch = _batch(b=6)
  visual = jnp.asarray([5, 6, 7, 8, 9])
  sums = jax.device_get(
      pretrain.eval_sums(
          task, model, batch, jax.random.key(1), visual, jnp.zeros((32, 32, 3))
      )
  )
  text_in, text_mask, _, patch_mask = task.masks(
      jax.random.split(jax.random.key(1))[0], batch, 64
  )
  text_mask = np.asarray(text_mask)
  is_visual = np.isin(np.asarray(batch["text"]), np.asarray(visual))
  assert sums["mlm_count"] == text_mask.sum()
  assert sums["visual_count"] == (text_mask & is_visual).sum()
  assert sums["patch_count"] == np.asarray(patch_mask).sum() == 6 * 48
  # Rows flagged as padding examples count for nothing.
  padded = dict(batch, example_valid=jnp.asarray([1, 1, 1, 0, 0, 0], bool))
  sums_p = jax.device_get(
      pretrain.eval_sums(
          task, model, padded, jax.random.key(1), visual, jnp.zeros((32, 32, 3))
      )
  )
  assert sums_p["mlm_count"] == text_mask[:3].sum()
  assert sums_p["patch_count"] == 3 * 48


def test_mim_baseline_by_hand():
  """mim_loss_baseline predicts each masked patch as the mean of the visible
  ones: check against numpy on the same masks."""
  task, model = _task_and_model()
  batch = _batch(b=3, seed=7)
  rng = jax.random.key(2)
  sums = jax.device_get(
      pretrain.eval_sums(
          task, model, batch, rng, jnp.asarray([5]), jnp.zeros((32, 32, 3))
      )
  )
  _, _, keep_idx, patch_mask = task.masks(jax.random.split(rng)[0], batch, 64)
  target = np.asarray(pretrain.patch_targets(batch["image"], 4, False))
  patch_mask = np.asarray(patch_mask)
  err = 0.0
  for i in range(3):
    mean = target[i][~patch_mask[i]].mean(0)
    err += ((target[i][patch_mask[i]] - mean) ** 2).mean(-1).sum()
  np.testing.assert_allclose(sums["mim_base_err"], err, rtol=1e-5)
