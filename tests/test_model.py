"""The EVE backbone: parameter counts, padding invariance, modality handling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax.model.eve import EVE
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.params_count import count_params
from eve_jax.model.variants import VARIANTS, ModelConfig


def expected_counts(v: str, vocab: int) -> tuple[int, int, int]:
  """(total, backbone, backbone per token) written out from the paper's
  architecture, independently of the model code."""
  t = VARIANTS[v]
  d, f, depth, e = t["width"], t["mlp_dim"], t["depth"], t["num_experts"]
  p, n = t["patch_size"], (t["image_size"] // t["patch_size"]) ** 2
  soft, hard, m, k = t["num_soft_layers"], depth - t["num_soft_layers"], 2, 2
  ffn = d * f + f + f * d + d
  image = p * p * 3 * d + d + d + (1 + n) * d  # patch proj, CLS, positions
  text = vocab * d + 2 * d + 196 * d  # words, LayerNorm, positions
  attn = 4 * d * d + 3 * d  # q, k, v, out kernels; q, v, out biases
  common = 2 * d + attn + 2 * d  # norm1, attention, two layer scales
  hard_block = common + m * (2 * d + ffn)
  soft_block = common + 2 * d + d * e + m * d + e * ffn
  backbone = (
      image
      + text
      + 2 * d
      + 2 * d
      + 2 * d  # type, pre/post LN
      + hard * hard_block
      + soft * soft_block
  )
  per_token = backbone - hard * (m - 1) * (2 * d + ffn) - soft * (e - k) * ffn
  mlm = d * d + d + 2 * d + d * vocab + vocab
  dd, ld = t["decoder_width"], t["decoder_depth"]
  dec_block = (
      2 * dd
      + 4 * dd * dd
      + 3 * dd
      + 2 * dd
      + (dd * 4 * dd + 4 * dd + 4 * dd * dd + dd)
  )
  decoder = (
      d * dd
      + dd
      + dd
      + (1 + n) * dd
      + ld * dec_block
      + 2 * dd
      + dd * p * p * 3
      + p * p * 3
  )
  return backbone + mlm + decoder, backbone, per_token


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "large"])
def test_parameter_counts_match_formula(variant):
  vocab = 30522
  cfg = ModelConfig.from_config({"variant": variant}, vocab_size=vocab)
  abstract = nnx.eval_shape(
      lambda: EVEPretrainModel(cfg, rngs=nnx.Rngs(params=0))
  )
  counts = count_params(nnx.state(abstract, nnx.Param), cfg)
  total, backbone, per_token = expected_counts(variant, vocab)
  assert counts == dict(
      total=total, backbone=backbone, backbone_per_token=per_token
  )
  if variant == "base":
    # Scale check: ViT-B (86M) + a second FFN in 10 hard layers (47M)
    # + 31 extra experts in 2 soft layers (292M) + text embeddings (24M);
    # per token: ViT-B + text embeddings + one more expert in 2 layers.
    assert 440e6 < backbone < 460e6 and 110e6 < per_token < 125e6


def test_variants_match_paper():
  base = ModelConfig.from_config({"variant": "base"})
  large = ModelConfig.from_config({"variant": "large"})
  assert (base.depth, base.width, base.heads) == (12, 768, 12)
  assert [i for i in range(12) if base.soft_layer(i)] == [10, 11]
  assert (large.depth, large.width, large.heads) == (24, 1024, 16)
  assert [i for i in range(24) if large.soft_layer(i)] == [21, 22, 23]
  for c in (base, large):
    assert (c.num_experts, c.top_k, c.patch_size, c.image_size) == (
        32,
        2,
        16,
        224,
    )
    assert (c.decoder_width, c.decoder_depth, c.decoder_heads) == (512, 8, 16)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="variant"):
    ModelConfig.from_config({"variant": "huge"})
  with pytest.raises(ValueError, match="widht"):
    ModelConfig.from_config({"variant": "tiny", "widht": 3})
  with pytest.raises(ValueError, match="heads"):
    ModelConfig.from_config({"variant": "tiny", "heads": 3})


def _tiny(**kw) -> ModelConfig:
  kw = dict(
      dict(
          VARIANTS["tiny"],
          vocab_size=50,
          max_text_len=16,
          drop_path=0.0,
          image_size=32,
          patch_size=4,
      ),
      **kw
  )
  return ModelConfig(**kw)


def _encode(model, images, text, valid):
  img = model.embed_image(images)
  txt = model.embed_text(text)
  states, stats = model.encode(img, txt, valid)
  return states, stats


@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_padding_content_does_not_change_other_tokens(capacity_factor):
  cfg = _tiny(capacity_factor=capacity_factor)
  model = EVE(cfg, rngs=nnx.Rngs(params=1))
  rng = np.random.default_rng(0)
  b, lt = 3, 16
  images = jnp.asarray(rng.uniform(-1, 1, (b, 32, 32, 3)), jnp.float32)
  lengths = np.array([5, 11, 16])
  valid = np.arange(lt)[None] < lengths[:, None]
  text = rng.integers(4, 50, (b, lt))
  other = np.where(valid, text, rng.integers(0, 50, (b, lt)))
  s1, st1 = _encode(model, images, jnp.asarray(text), jnp.asarray(valid))
  s2, st2 = _encode(model, images, jnp.asarray(other), jnp.asarray(valid))
  keep = np.concatenate([np.ones((b, 65), bool), valid], axis=1)
  np.testing.assert_allclose(
      np.asarray(s1)[keep], np.asarray(s2)[keep], rtol=1e-5, atol=1e-5
  )
  # Padding is never routed: routed = K * (image + valid text tokens).
  assert float(st1[0].routed) == 2 * (b * 65 + valid.sum())
  # And the check is not vacuous: a real token's change does change others.
  changed = text.copy()
  changed[0, 1] = (changed[0, 1] + 1 - 4) % 46 + 4
  s3, _ = _encode(model, images, jnp.asarray(changed), jnp.asarray(valid))
  assert np.abs(np.asarray(s3)[0, 0] - np.asarray(s1)[0, 0]).max() > 1e-4


def test_more_padding_does_not_change_outputs():
  cfg = _tiny(capacity_factor=0.0)  # no dropping: capacity grows with L
  model = EVE(cfg, rngs=nnx.Rngs(params=2))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  text = rng.integers(4, 50, (2, 8))
  valid = np.ones((2, 8), bool)
  s1, _ = _encode(model, images, jnp.asarray(text), jnp.asarray(valid))
  text2 = np.concatenate([text, np.zeros((2, 8), int)], axis=1)
  valid2 = np.concatenate([valid, np.zeros((2, 8), bool)], axis=1)
  s2, _ = _encode(model, images, jnp.asarray(text2), jnp.asarray(valid2))
  np.testing.assert_allclose(
      np.asarray(s1), np.asarray(s2)[:, : 65 + 8], rtol=1e-5, atol=1e-5
  )


def test_visible_subset_uses_modality_ids_not_positions():
  """The MIM pass feeds 1 + N/4 image tokens: the hard-router layers must
  still apply the image FFN to exactly those, the text FFN to the text."""
  cfg = _tiny(num_soft_layers=0, depth=1, layer_scale_init=1.0)
  model = EVE(cfg, rngs=nnx.Rngs(params=3))
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(4, 50, (2, 6)))
  valid = jnp.ones((2, 6), bool)
  img = model.embed_image(images)[:, :17]  # CLS + 16 "visible" patches
  states, _ = model.encode(img, model.embed_text(text), valid)
  # Recompute the one block by hand: attention part, then per-modality FFN.
  block = model.blocks[0]
  x = model.pre_norm(jnp.concatenate([img, model.embed_text(text)], 1))
  x = x + block.gamma_1[...] * block.attn(block.norm1(x), None)
  ffn = block.ffn

  def ffn_m(h, m):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-6) * ffn.norm_scale[...][
        m
    ] + ffn.norm_bias[...][m]
    h = jax.nn.gelu(h @ ffn.wi[...][m] + ffn.bi[...][m], approximate=False)
    return h @ ffn.wo[...][m] + ffn.bo[...][m]

  want = jnp.concatenate([ffn_m(x[:, :17], 0), ffn_m(x[:, 17:], 1)], 1)
  want = model.norm(x + block.gamma_2[...] * want)
  np.testing.assert_allclose(
      np.asarray(states), np.asarray(want), rtol=2e-4, atol=2e-4
  )


def test_drop_path_only_with_rng():
  cfg = dataclasses.replace(_tiny(), drop_path=0.5)
  model = EVE(cfg, rngs=nnx.Rngs(params=4))
  images = jnp.zeros((4, 32, 32, 3))
  text = jnp.full((4, 6), 5)
  valid = jnp.ones((4, 6), bool)
  img, txt = model.embed_image(images), model.embed_text(text)
  a, _ = model.encode(img, txt, valid)
  b, _ = model.encode(img, txt, valid)
  c, _ = model.encode(img, txt, valid, rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
