"""eve_jax.convert: BEiT and released-EVE checkpoints -> eve_jax, checked
against independent references.

- BEiT: Hugging Face transformers' `BeitModel` (PyTorch) with random
  weights is saved, converted and compared block by block and as a whole
  image encoder. Needs the `convert` extra (torch, transformers): skipped
  cleanly without it.
- Released EVE: a state dict in the released layout (random values, base
  shapes scaled down) is converted and checked tensor by tensor (round
  trip), and blocks and the whole VQA model are compared with a NumPy
  float64 forward written here from the architecture description
  (github.com/ssyze/EVE models/multiway_transformer.py, sharded_moe.py).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax.convert import beit, infer, layout, output, released
from eve_jax.convert import released_export
from eve_jax.convert.__main__ import main
from eve_jax.convert.source import ConversionError
from eve_jax.model import task_models
from eve_jax.model.block import Block
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.variants import ModelConfig

TOL = 1e-4  # float32 eve_jax vs float32 PyTorch
TOL64 = 1e-5  # float32 eve_jax vs the float64 NumPy reference


# ---------------------------------------------------------------- helpers


def _torch():
  return pytest.importorskip("torch")


def _hf_beit(width, depth, heads, mlp, image, seed=0):
  """A random-weight HF BeitModel without relative position bias or
  absolute positions, final LayerNorm on (use_mean_pooling=False)."""
  torch = _torch()
  tf = pytest.importorskip("transformers")
  cfg = tf.BeitConfig(
      hidden_size=width,
      num_hidden_layers=depth,
      num_attention_heads=heads,
      intermediate_size=mlp,
      image_size=image,
      patch_size=16,
      use_absolute_position_embeddings=False,
      use_relative_position_bias=False,
      use_shared_relative_position_bias=False,
      use_mean_pooling=False,
      layer_norm_eps=1e-6,
      hidden_act="gelu",
      layer_scale_init_value=0.1,
  )
  torch.manual_seed(seed)
  model = tf.BeitModel(cfg, add_pooling_layer=False).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    # O(1) residual branches: LayerNorm scales near 1, layer scale in
    # [0.5, 1], weights ~ 1/sqrt(fan_in), visible biases.
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if "layernorm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * r)
      elif "lambda" in name:
        p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
      elif p.ndim == 1 or name.endswith("cls_token"):
        p.copy_(0.1 * r)
      else:
        p.copy_(r / math.sqrt(p[0].numel()))
  return model


def _numpy_sd(model):
  return {
      k: v.detach().numpy().astype(np.float32)
      for k, v in model.state_dict().items()
  }


def _filled(tree, rng):
  """ShapeDtypeStruct leaves (parameters a checkpoint lacks) -> random."""
  return jax.tree.map(
      lambda x: (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
      if isinstance(x, jax.ShapeDtypeStruct)
      else x,
      tree,
  )


def _block(params, kind, d, h, f, e=4, activation="gelu", cf=1.0, seed=0):
  """An eve_jax Block holding `params` (missing ones random)."""
  abstract = nnx.eval_shape(
      lambda: Block(
          d,
          h,
          f,
          ffn=kind,
          layer_scale_init=0.1,
          drop_path_rate=0.0,
          activation=activation,
          moe=MoEConfig(
              e,
              2,
              capacity_factor=cf,
              normalize_gates=True,
              activation=activation,
          ),
          rngs=nnx.Rngs(0),
      )
  )
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  merged = _merge(pure, params)
  nnx.replace_by_pure_dict(state, _filled(merged, np.random.default_rng(seed)))
  return nnx.merge(graphdef, state)


def _merge(target, params):
  if isinstance(target, dict):
    return {
        k: _merge(v, params.get(k, {}) if isinstance(params, dict) else {})
        for k, v in target.items()
    }
  return params if isinstance(params, np.ndarray) else target


def _run_block(block, x, n_image, n_text, valid=None):
  b, length, _ = x.shape
  modality = jnp.concatenate(
      [jnp.zeros((b, n_image), jnp.int32), jnp.ones((b, n_text), jnp.int32)], 1
  )
  if valid is None:
    valid = jnp.ones((b, length), bool)
  y, _ = block(
      jnp.asarray(x, jnp.float32),
      valid=jnp.asarray(valid),
      modality=modality,
      counts=(n_image, n_text),
  )
  return np.asarray(y)


# ------------------------------------------------------- BEiT: layouts


def _to_v4(sd):
  """HF transformers-5 names -> the transformers-4 names of hub files."""
  out = {}
  for k, v in sd.items():
    k2 = k.replace("layers.", "encoder.layer.")
    for a, b in (
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ):
      k2 = k2.replace(a, b)
    out["beit." + k2] = v
  return out


def _to_timm(sd, depth, unilm: bool):
  """HF names -> timm / unilm BEiTv2 names (fused qkv, gamma_1, ...)."""
  out = {
      "cls_token": sd["embeddings.cls_token"],
      "patch_embed.proj.weight": sd[
          "embeddings.patch_embeddings.projection.weight"
      ],
      "patch_embed.proj.bias": sd[
          "embeddings.patch_embeddings.projection.bias"
      ],
  }
  d = out["cls_token"].shape[-1]
  heads = 4
  num_rel = (2 * 2 - 1) ** 2 + 3  # a 2x2 patch grid
  for i in range(depth):
    h, b = f"layers.{i}.", f"blocks.{i}."
    out[b + "attn.qkv.weight"] = np.concatenate(
        [sd[h + f"attention.{n}_proj.weight"] for n in "qkv"]
    )
    out[b + "attn.q_bias"] = sd[h + "attention.q_proj.bias"]
    out[b + "attn.v_bias"] = sd[h + "attention.v_proj.bias"]
    out[b + "attn.proj.weight"] = sd[h + "attention.o_proj.weight"]
    out[b + "attn.proj.bias"] = sd[h + "attention.o_proj.bias"]
    for a, c in (("lambda_1", "gamma_1"), ("lambda_2", "gamma_2")):
      out[b + c] = sd[h + a]
    for a, c in (
        ("layernorm_before", "norm1"),
        ("layernorm_after", "norm2"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ):
      out[b + c + ".weight"] = sd[h + a + ".weight"]
      out[b + c + ".bias"] = sd[h + a + ".bias"]
    if not unilm:  # timm: a relative position bias per block
      out[b + "attn.relative_position_bias_table"] = np.ones(
          (num_rel, heads), np.float32
      )
      out[b + "attn.relative_position_index"] = np.zeros((5, 5), np.int64)
  if unilm:  # shared bias, MIM and CLS-pretraining heads
    out["rel_pos_bias.relative_position_bias_table"] = np.ones(
        (num_rel, heads), np.float32
    )
    out["rel_pos_bias.relative_position_index"] = np.zeros((5, 5), np.int64)
    out["mask_token"] = np.zeros((1, 1, d), np.float32)
    out["lm_head.weight"] = np.zeros((8, d), np.float32)
    out["lm_head.bias"] = np.zeros((8,), np.float32)
    out["cls_pt_layers.0.norm1.weight"] = np.zeros((d,), np.float32)
    out["norm.weight"] = sd["layernorm.weight"]
    out["norm.bias"] = sd["layernorm.bias"]
  else:
    out["fc_norm.weight"] = sd["layernorm.weight"]
    out["fc_norm.bias"] = sd["layernorm.bias"]
    out["head.weight"] = np.zeros((10, d), np.float32)
    out["head.bias"] = np.zeros((10,), np.float32)
  return out


def test_beit_layouts_agree():
  """HF (transformers 5 and 4 names), unilm and timm files of the same
  weights convert to the same eve_jax tensors; each layout's extras are
  dropped with a reason, and only those."""
  model = _hf_beit(64, 2, 4, 128, 32)
  sd = _numpy_sd(model)
  kw = dict(heads=4, image_size=32, num_soft_layers=1, num_experts=3)
  ref, cfg, pieces = beit.convert(sd, "hf.pth", **kw)
  assert pieces["layout"] == "hf" and pieces["dropped"] == []
  assert cfg["depth"] == 2 and cfg["width"] == 64 and cfg["mlp_dim"] == 128
  flat = layout.flatten(ref)
  for name, other in (
      ("hf_v4", _to_v4(sd)),
      ("unilm", _to_timm(sd, 2, unilm=True)),
      ("timm", _to_timm(sd, 2, unilm=False)),
  ):
    params, _, p = beit.convert(other, name + ".pth", **kw)
    assert p["layout"] == name
    got = layout.flatten(params)
    if name == "timm":  # fc_norm is the head's: no final norm to load
      assert ("backbone", "norm", "scale") not in got
      flat_cmp = {k: v for k, v in flat.items() if k[1] != "norm"}
    else:
      flat_cmp = flat
    assert set(got) == set(flat_cmp), name
    for k in flat_cmp:
      np.testing.assert_array_equal(got[k], flat_cmp[k], err_msg=str(k))
    dropped = {k for k, _, _ in p["dropped"]}
    extra = set(other) - {
        k
        for k in other
        if "rel" not in k
        and k
        not in (
            "mask_token",
            "fc_norm.weight",
            "fc_norm.bias",
            "head.weight",
            "head.bias",
            "lm_head.weight",
            "lm_head.bias",
            "cls_pt_layers.0.norm1.weight",
        )
    }
    assert dropped == extra, name
  # Where the tensors land: conv -> [kh, kw, in, out], q rows -> heads,
  # the FFN in both modality FFNs and in every expert.
  w = sd["embeddings.patch_embeddings.projection.weight"]
  np.testing.assert_array_equal(
      ref["backbone"]["image_embed"]["patch_kernel"][3, 5, 1, 7], w[7, 1, 3, 5]
  )
  q = sd["layers.0.attention.q_proj.weight"]
  np.testing.assert_array_equal(
      ref["backbone"]["blocks"][0]["attn"]["q_kernel"][:, 2, 5], q[2 * 16 + 5]
  )
  fc1 = sd["layers.1.mlp.fc1.weight"]
  for e in range(3):
    np.testing.assert_array_equal(
        ref["backbone"]["blocks"][1]["ffn"]["wi"][e], fc1.T
    )
  hard = ref["backbone"]["blocks"][0]["ffn"]
  np.testing.assert_array_equal(hard["wo"][0], hard["wo"][1])
  np.testing.assert_array_equal(hard["wo"][1], sd["layers.0.mlp.fc2.weight"].T)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda sd: sd.pop("layers.1.attention.v_proj.bias"),
            "missing layers.1.attention.v_proj.bias (expected shape [64])",
        ),
        (
            lambda sd: sd.update({"layers.0.extra.weight": np.zeros((3, 2))}),
            "unexpected key layers.0.extra.weight with shape [3, 2]",
        ),
        (
            lambda sd: sd.update({"layers.1.mlp.fc2.bias": np.zeros((65,))}),
            "layers.1.mlp.fc2.bias has shape [65], expected [64]",
        ),
    ],
)
def test_beit_bad_input_one_line(mutate, message):
  sd = _numpy_sd(_hf_beit(64, 2, 4, 128, 32))
  mutate(sd)
  with pytest.raises(ConversionError) as e:
    beit.convert(sd, "ckpt.pth", heads=4, image_size=32)
  assert message in str(e.value) and "ckpt.pth" in str(e.value)
  assert "\n" not in str(e.value)


def test_beit_cli_errors_exit_1(tmp_path, capsys):
  torch = _torch()
  bad = tmp_path / "bad.pth"
  torch.save({"model": {"foo.weight": torch.zeros(2)}}, bad)
  assert main(["beitv2", "--in", str(bad), "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("eve_jax: error: ") and "\n" not in err
  assert "not a BEiT state dict" in err
  assert (
      main(
          [
              "beitv2",
              "--in",
              str(tmp_path / "nope.pth"),
              "--out",
              str(tmp_path / "o"),
          ]
      )
      == 1
  )
  assert "no such file" in capsys.readouterr().err


# --------------------------------------------- BEiT: parity with PyTorch


def _beit_blocks_parity(
    width, depth, heads, mlp, image, num_soft, experts, batch=2
):
  """Max abs error of each eve_jax block vs the same HF BeitLayer, fed the
  reference's own hidden states."""
  torch = _torch()
  model = _hf_beit(width, depth, heads, mlp, image)
  sd = _numpy_sd(model)
  params, _, _ = beit.convert(
      sd,
      "hf.pth",
      heads=heads,
      image_size=image,
      num_soft_layers=num_soft,
      num_experts=experts,
  )
  g = torch.Generator().manual_seed(1)
  pixels = torch.rand((batch, 3, image, image), generator=g) * 2 - 1
  with torch.no_grad():
    hidden = model(pixels, output_hidden_states=True).hidden_states
  assert len(hidden) == depth + 1  # embeddings, then every layer's output
  errors, moved = [], []
  n_image = 1 + (image // 16) ** 2
  for i in range(depth):
    kind = "soft" if i >= depth - num_soft else "hard"
    # No capacity limit (capacity_factor 0): identical experts with
    # renormalized gates then give exactly the BEiT FFN.
    block = _block(
        params["backbone"]["blocks"][i],
        kind,
        width,
        heads,
        mlp,
        e=experts,
        cf=0.0,
    )
    x = hidden[i].numpy()
    y = _run_block(block, x, n_image, 0)
    errors.append(float(np.max(np.abs(y - hidden[i + 1].numpy()))))
    moved.append(float(np.max(np.abs(hidden[i + 1].numpy() - x))))
  return errors, moved


def test_beit_blocks_match_transformers_base():
  """Base size (768 wide, 12 heads, MLP 3072), all 12 blocks: 10 as
  hard-router blocks (image FFN), the top 2 as soft-router blocks (every
  expert a copy of the FFN; 4 experts instead of 32 to save memory)."""
  t0 = time.time()
  errors, moved = _beit_blocks_parity(768, 12, 12, 3072, 224, 2, 4, batch=1)
  print(
      f"\nBEiT base block max abs errors: "
      f"{[f'{e:.2e}' for e in errors]} ({time.time() - t0:.1f} s)"
  )
  assert max(errors) <= TOL, errors
  assert min(moved) > 0.1  # every block really changes its input


def _write_beit(tmp_path, model):
  torch = _torch()
  path = tmp_path / "beit.pth"
  torch.save(model.state_dict(), path)
  return path


def _encoder_parity(
    tmp_path, width, depth, heads, mlp, image, num_soft, experts, batch
):
  torch = _torch()
  model = _hf_beit(width, depth, heads, mlp, image)
  path = _write_beit(tmp_path, model)
  out = tmp_path / "converted"
  assert (
      main(
          [
              "beitv2",
              "--in",
              str(path),
              "--out",
              str(out),
              "--heads",
              str(heads),
              "--image-size",
              str(image),
              "--soft-layers",
              str(num_soft),
              "--experts",
              str(experts),
          ]
      )
      == 0
  )
  rep = json.load(open(out / "conversion_report.json"))
  assert rep["layout"] == "hf"
  with open(out / "config.json") as f:
    assert json.load(f)["model"]["heads"] == heads
  new = {p for p, _ in rep["new"]}
  assert "backbone/image_embed/pos_embed" in new  # BEiT had none
  # The embedding-level differences off, as in BEiT (no pre-stack LN, no
  # absolute positions, no type embedding), GELU; no capacity limit (with
  # a random router, tokens crowd into a few experts and get dropped).
  eve, _ = output.load(
      str(out),
      overrides=dict(
          pre_norm=False,
          position_embed=False,
          type_embed=False,
          activation="gelu",
          capacity_factor=0.0,
      ),
  )
  g = torch.Generator().manual_seed(2)
  pixels = torch.rand((batch, 3, image, image), generator=g) * 2 - 1
  with torch.no_grad():
    want = model(pixels).last_hidden_state.numpy()
  images = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))
  text = jnp.zeros((batch, 0), jnp.int32)
  got = infer._outputs(eve, images, text, text.astype(bool))
  err = float(np.max(np.abs(np.asarray(got["image_states"]) - want)))
  assert err <= TOL, err
  return err


def test_beit_encoder_matches_transformers_small(tmp_path, capsys):
  """CLI conversion -> DIR -> the whole image-only encoder, scaled down
  (4 blocks, the top 2 soft-router); then `run` on an image file."""
  err = _encoder_parity(tmp_path, 128, 4, 4, 512, 64, 2, 4, batch=2)
  print(f"\nBEiT small encoder max abs error: {err:.2e}")
  from PIL import Image

  img = tmp_path / "img.jpg"
  Image.fromarray(np.full((70, 90, 3), 200, np.uint8)).save(img)
  capsys.readouterr()
  assert (
      main(["run", "--model", str(tmp_path / "converted"), "--image", str(img)])
      == 0
  )
  pair = json.loads(capsys.readouterr().out)["pairs"][0]
  assert set(pair["feature_norms"]) == {"image_features"}
  assert (
      main(
          [
              "run",
              "--model",
              str(tmp_path / "converted"),
              "--image",
              str(img),
              "--text",
              "a cat",
          ]
      )
      == 1
  )
  assert "no tokenizer.model or tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
def test_beit_encoder_matches_transformers_base(tmp_path):
  """Base size, 32 experts in the top 2 blocks, 224 px, two images."""
  err = _encoder_parity(tmp_path, 768, 12, 12, 3072, 224, 2, 32, batch=2)
  print(f"\nBEiT base encoder max abs error: {err:.2e}")


# -------------------------------------------- released EVE: the layout


_SMALL = dict(
    d=64,
    heads=4,
    f=256,
    depth=4,
    soft=2,
    experts=4,
    vocab=100,
    image=32,
    patch=16,
    text_positions=196,
    answers=10,
)


def _released_sd(
    rng,
    d,
    heads,
    f,
    depth,
    soft,
    experts,
    vocab,
    image,
    patch,
    text_positions,
    answers,
):
  """A state dict in the released layout, random values (VQA fine-tuned,
  with the buffers and unused heads real files carry)."""
  n = (image // patch) ** 2

  def t(*shape, scale=None):
    scale = scale or (1 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def ln(key, dim=d):
    sd[key + ".weight"] = 1 + t(dim, scale=0.2)
    sd[key + ".bias"] = t(dim)

  def lin(key, out_dim, in_dim, bias=True):
    sd[key + ".weight"] = t(out_dim, in_dim)
    if bias:
      sd[key + ".bias"] = t(out_dim)

  b = "backbone."
  sd = {
      b + "patch_embed.weight": t(d, 3, patch, patch),
      b + "patch_embed.bias": t(d),
      b + "class_embedding_vision": t(d),
      b + "type_embed_vision": t(d),
      b + "type_embed_text": t(d),
      b + "pos_embed_vision": t(1 + n, d, scale=0.1),
      b + "word_embedding.weight": t(vocab, d, scale=1.0),
      b + "pos_embed_text": t(text_positions, d, scale=0.1),
      b + "position_ids_vision": np.arange(1 + n)[None],
      b + "position_ids_text": np.arange(text_positions),
  }
  ln(b + "layer_norm_text")
  ln(b + "pre_layrnorm")
  ln(b + "norm")
  for i in range(depth):
    p = b + f"encoder.layers.{i}."
    ln(p + "norm1")
    lin(p + "attn.qkv", 3 * d, d, bias=False)
    sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = t(d), t(d)
    lin(p + "attn.proj", d, d)
    sd[p + "gamma_1"] = (0.5 + 0.5 * rng.random(d)).astype(np.float32)
    sd[p + "gamma_2"] = (0.5 + 0.5 * rng.random(d)).astype(np.float32)
    if i >= depth - soft:
      m = p + "mlp_moe.moe."
      ln(p + "norm2_vl")
      sd[m + "gate.wg.weight"] = t(experts, d, scale=0.5)
      sd[m + "vision_embed"], sd[m + "text_embed"] = t(d), t(d)
      for e in range(experts):
        lin(m + f"experts.experts.{e}.fc1", f, d)
        lin(m + f"experts.experts.{e}.fc2", d, f)
    else:
      for s in ("imag", "text"):
        ln(p + f"norm2_{s}")
        lin(p + f"mlp_{s}.fc1", f, d)
        lin(p + f"mlp_{s}.fc2", d, f)
  lin("output.0", 2 * d, d)
  ln("output.1", 2 * d)
  lin("output.3", answers, 2 * d)
  sd["itc_vl_vision_proj_head.weight"] = t(d, d)  # unused by the released
  return sd


def test_released_round_trip_exact():
  """Every tensor lands where it should: released -> eve_jax -> released
  gives the same bits for every mapped key, and eve_jax -> released ->
  eve_jax too; only buffers and unused heads are dropped."""
  sd = _released_sd(np.random.default_rng(0), **_SMALL)
  params, cfg, pieces = released.from_released(sd, "eve.th", 4)
  assert cfg["num_soft_layers"] == 2 and cfg["num_experts"] == 4
  assert cfg["activation"] == "quick_gelu" and pieces["heads"] == ["vqa"]
  dropped = {k for k, _, _ in pieces["dropped"]}
  assert dropped == {
      "backbone.position_ids_vision",
      "backbone.position_ids_text",
      "itc_vl_vision_proj_head.weight",
  }
  back = released_export.to_released(params, cfg)
  assert set(back) == set(sd) - dropped
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  again, _, _ = released.from_released(back, "back.th", 4)
  flat, flat2 = layout.flatten(params), layout.flatten(again)
  assert set(flat) == set(flat2)
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat2[k], err_msg=str(k))
  # A few landings spelled out (a consistent error both ways would
  # round-trip too).
  bb = params["backbone"]
  qkv = sd["backbone.encoder.layers.1.attn.qkv.weight"]
  np.testing.assert_array_equal(
      bb["blocks"][1]["attn"]["v_kernel"][:, 3, 2], qkv[2 * 64 + 3 * 16 + 2]
  )
  np.testing.assert_array_equal(
      bb["type_embed"][1], sd["backbone.type_embed_text"]
  )
  np.testing.assert_array_equal(
      bb["blocks"][3]["ffn"]["wo"][2],
      sd[
          "backbone.encoder.layers.3.mlp_moe.moe.experts.experts.2.fc2.weight"
      ].T,
  )
  np.testing.assert_array_equal(
      bb["blocks"][0]["ffn"]["norm_scale"][1],
      sd["backbone.encoder.layers.0.norm2_text.weight"],
  )
  np.testing.assert_array_equal(
      bb["blocks"][2]["ffn"]["modality_embed"][0],
      sd["backbone.encoder.layers.2.mlp_moe.moe.vision_embed"],
  )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda sd: sd.pop(
                "backbone.encoder.layers.2.mlp_moe.moe.text_embed"
            ),
            "missing backbone.encoder.layers.2.mlp_moe.moe.text_embed (expected "
            "shape [64])",
        ),
        (
            lambda sd: sd.update(
                {
                    "backbone.encoder.layers.0.attn.k_bias": np.zeros(
                        64, np.float32
                    )
                }
            ),
            "unexpected key backbone.encoder.layers.0.attn.k_bias with shape [64]",
        ),
        (
            lambda sd: sd.update(
                {"backbone.encoder.layers.1.gamma_2": np.zeros(32, np.float32)}
            ),
            "backbone.encoder.layers.1.gamma_2 has shape [32], expected [64]",
        ),
    ],
)
def test_released_bad_input_one_line(mutate, message):
  sd = _released_sd(np.random.default_rng(0), **_SMALL)
  mutate(sd)
  with pytest.raises(ConversionError) as e:
    released.from_released(sd, "eve.th", 4)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_released_drop_and_pretrained_head_names():
  """An unknown head is an error until --drop names it; pretrained files'
  mitc_*/mitm_head load as the retrieval heads."""
  sd = _released_sd(np.random.default_rng(0), **_SMALL)
  for k in [k for k in sd if k.startswith("output.")]:
    del sd[k]
  sd["mlm_head.dense.weight"] = np.zeros((64, 64), np.float32)
  sd["mitc_vision_proj_head.weight"] = np.ones((64, 64), np.float32)
  sd["mitc_text_proj_head.weight"] = np.ones((64, 64), np.float32)
  sd["mitc_temp"] = np.float32(0.05) * np.ones((), np.float32)
  sd["mitm_head.weight"] = np.ones((2, 64), np.float32)
  sd["mitm_head.bias"] = np.ones((2,), np.float32)
  with pytest.raises(
      ConversionError,
      match=r"unexpected key mlm_head\.dense"
      r"\.weight with shape \[64, 64\].*\(--drop PREFIX",
  ):
    released.from_released(sd, "eve.th", 4)
  params, _, pieces = released.from_released(
      sd, "eve.th", 4, drop=["mlm_head."]
  )
  assert pieces["heads"] == ["retrieval"]
  assert float(params["matching"]["temp"]) == pytest.approx(0.05)
  assert ["mlm_head.dense.weight", [64, 64], "--drop mlm_head."] in pieces[
      "dropped"
  ]


# ------------------------------ released EVE: NumPy float64 reference


def _np_ln(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _quick_gelu(x):
  return x / (1 + np.exp(-1.702 * x))


def _np_mlp(x, sd, key):
  h = _quick_gelu(x @ sd[key + ".fc1.weight"].T + sd[key + ".fc1.bias"])
  return h @ sd[key + ".fc2.weight"].T + sd[key + ".fc2.bias"]


def _np_attention(x, sd, p, heads, valid):
  """Released Attention: qkv = x W^T + [q_bias, 0, v_bias], q scaled,
  padding keys masked, softmax, proj."""
  b, length, d = x.shape
  k = d // heads
  bias = np.concatenate(
      [sd[p + "attn.q_bias"], np.zeros(d), sd[p + "attn.v_bias"]]
  )
  qkv = (x @ sd[p + "attn.qkv.weight"].T + bias).reshape(b, length, 3, heads, k)
  q, kk, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
  logits = (q * k**-0.5) @ kk.transpose(0, 1, 3, 2)
  logits = np.where(valid[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
  return out @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]


def _np_top2_moe(
    h, sd, m, n_image, experts, capacity_factor=1.0, min_capacity=4
):
  """DeepSpeed top2gating as the released MOELayer runs it, without the
  Gumbel noise on the 2nd choice: modality embedding added (first n_image
  tokens image) to router AND expert input, all tokens of the batch one
  group, top-1 slots first then top-2, capacity drops, kept gates
  renormalized. Returns (output, number of dropped assignments)."""
  b, length, d = h.shape
  x = h.copy()
  x[:, :n_image] += sd[m + "vision_embed"]
  x[:, n_image:] += sd[m + "text_embed"]
  x = x.reshape(-1, d)
  s = x.shape[0]
  logits = x @ sd[m + "gate.wg.weight"].T
  gates = np.exp(logits - logits.max(-1, keepdims=True))
  gates /= gates.sum(-1, keepdims=True)
  cap = max(math.ceil(s / experts * capacity_factor * 2), min_capacity)
  i1 = gates.argmax(-1)
  i2 = np.where(np.eye(experts, dtype=bool)[i1], -np.inf, logits).argmax(-1)
  m1, m2 = np.eye(experts)[i1], np.eye(experts)[i2]
  loc1 = np.cumsum(m1, 0) - 1
  loc2 = np.cumsum(m2, 0) - 1 + m1.sum(0)
  keep1 = (loc1 * m1).sum(-1) < cap
  keep2 = (loc2 * m2).sum(-1) < cap
  g1 = gates[np.arange(s), i1] * keep1
  g2 = gates[np.arange(s), i2] * keep2
  denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
  g1, g2 = g1 / denom, g2 / denom
  out = np.zeros_like(x)
  for t in range(s):
    for e, g in ((i1[t], g1[t]), (i2[t], g2[t])):
      if g:
        out[t] += g * _np_mlp(x[t], sd, m + f"experts.experts.{e}")
  dropped = int((~keep1).sum() + (~keep2).sum())
  return out.reshape(b, length, d), dropped


def _np_block(x, sd, i, heads, n_image, n_text, valid, experts):
  """One released encoder layer (mode 'vl'), float64."""
  p = f"backbone.encoder.layers.{i}."
  h = _np_attention(
      _np_ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"]),
      sd,
      p,
      heads,
      valid,
  )
  x = x + h * sd[p + "gamma_1"]
  dropped = 0
  if p + "norm2_vl.weight" in sd:
    h = _np_ln(x, sd[p + "norm2_vl.weight"], sd[p + "norm2_vl.bias"])
    h, dropped = _np_top2_moe(h, sd, p + "mlp_moe.moe.", n_image, experts)
  else:  # hard router: the tokens after the first n_image are text
    vis, txt = x[:, :n_image], x[:, n_image:]
    h = np.concatenate(
        [
            _np_mlp(
                _np_ln(
                    vis, sd[p + "norm2_imag.weight"], sd[p + "norm2_imag.bias"]
                ),
                sd,
                p + "mlp_imag",
            ),
            _np_mlp(
                _np_ln(
                    txt, sd[p + "norm2_text.weight"], sd[p + "norm2_text.bias"]
                ),
                sd,
                p + "mlp_text",
            ),
        ],
        1,
    )
  return x + h * sd[p + "gamma_2"], dropped


def _sd64(sd):
  return {k: np.asarray(v, np.float64) for k, v in sd.items()}


def test_released_blocks_match_numpy_float64():
  """A hard-router block (batch 2, padded text) and a soft-router block
  (one sample, routing that overflows capacity so drops happen) through
  eve_jax and through the NumPy float64 reference of the released code."""
  c = _SMALL
  rng = np.random.default_rng(1)
  sd = _released_sd(rng, **c)
  params, cfg, _ = released.from_released(sd, "eve.th", 4)
  sd64 = _sd64(sd)
  d, heads, f = c["d"], c["heads"], c["f"]
  n_image, n_text = 1 + (c["image"] // c["patch"]) ** 2, 40
  # Hard router, block 1: text padded after 25 and 33 tokens.
  x = rng.standard_normal((2, n_image + n_text, d))
  valid = np.ones((2, n_image + n_text), bool)
  valid[0, n_image + 25 :] = valid[1, n_image + 33 :] = False
  block = _block(
      params["backbone"]["blocks"][1],
      "hard",
      d,
      heads,
      f,
      activation="quick_gelu",
  )
  got = _run_block(block, x, n_image, n_text, valid)
  want, _ = _np_block(x, sd64, 1, heads, n_image, n_text, valid, 4)
  err_hard = float(np.max(np.abs(got - want)[valid]))
  # Soft router, block 3: a shared direction in every token makes most
  # pick the same expert, overflowing capacity ceil(2 * 45 / 4) = 23.
  x = rng.standard_normal((1, n_image + n_text, d))
  x += 3 * sd["backbone.encoder.layers.3.mlp_moe.moe.gate.wg.weight"][0]
  valid = np.ones((1, n_image + n_text), bool)
  block = _block(
      params["backbone"]["blocks"][3],
      "soft",
      d,
      heads,
      f,
      e=c["experts"],
      activation="quick_gelu",
      cf=cfg["capacity_factor"],
  )
  got = _run_block(block, x, n_image, n_text, valid)
  want, dropped = _np_block(
      x, sd64, 3, heads, n_image, n_text, valid, c["experts"]
  )
  err_soft = float(np.max(np.abs(got - want)))
  print(
      f"\nreleased blocks vs float64: hard {err_hard:.2e}, soft "
      f"{err_soft:.2e} ({dropped} assignments dropped)"
  )
  assert dropped > 0  # the capacity rule is exercised
  assert err_hard <= TOL64 and err_soft <= TOL64
  assert np.max(np.abs(want - x)) > 0.1


def _np_mha(xq, xkv, sd, name, heads, kv_valid):
  """torch nn.MultiheadAttention (fused in_proj, k bias included)."""
  b, lq, d = xq.shape
  hd = d // heads
  w, bias = sd[name + ".in_proj_weight"], sd[name + ".in_proj_bias"]
  q = (xq @ w[:d].T + bias[:d]) * hd**-0.5
  k = xkv @ w[d : 2 * d].T + bias[d : 2 * d]
  v = xkv @ w[2 * d :].T + bias[2 * d :]
  split = lambda t: t.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2)
  logits = np.where(kv_valid[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, lq, d)
  return out @ sd[name + ".out_proj.weight"].T + sd[name + ".out_proj.bias"]


def _np_biattn(h0, h1, v0, v1, sd, heads):
  """The released NLVR2 --biattn head, float64."""
  a0 = _np_mha(h0, h1, sd, "attn1", heads, v1)
  a1 = _np_mha(h1, h0, sd, "attn2", heads, v0)
  relu = lambda t: np.maximum(t, 0)
  fc = lambda t: relu(t @ sd["fc.0.weight"].T + sd["fc.0.bias"])
  f0, f1 = fc(np.concatenate([a0, h0], -1)), fc(np.concatenate([a1, h1], -1))

  def pool(f, valid):
    score = relu(f @ sd["attn_pool.fc.0.weight"].T + sd["attn_pool.fc.0.bias"])[
        ..., 0
    ]
    score = score + (~valid) * -1e4
    w = np.exp(score - score.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bl,bld->bd", w, f)

  pooled = np.concatenate([pool(f0, v0), pool(f1, v1)], -1)
  return pooled @ sd["nlvr2_output.weight"].T + sd["nlvr2_output.bias"]


def test_released_nlvr2_head_matches_numpy_float64():
  """The NLVR2 bi-attention head: converted into eve_jax's BiAttentionHead
  (the MultiheadAttention k bias dropped: it cancels), round trip exact but
  for that k bias, output equal to the float64 reference (k bias kept)."""
  from eve_jax.model.task_models import BiAttentionHead

  rng = np.random.default_rng(7)
  sd = _released_sd(rng, **_SMALL)
  for k in [k for k in sd if k.startswith("output.")]:
    del sd[k]
  d = _SMALL["d"]
  t = lambda *shape: (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(
      np.float32
  )
  for a in ("attn1", "attn2"):
    sd[a + ".in_proj_weight"], sd[a + ".in_proj_bias"] = t(3 * d, d), t(3 * d)
    sd[a + ".out_proj.weight"], sd[a + ".out_proj.bias"] = t(d, d), t(d)
  sd["fc.0.weight"], sd["fc.0.bias"] = t(d, 2 * d), t(d)
  sd["attn_pool.fc.0.weight"] = t(1, d)
  sd["attn_pool.fc.0.bias"] = np.full((1,), 0.3, np.float32)
  sd["nlvr2_output.weight"], sd["nlvr2_output.bias"] = t(2, 2 * d), t(2)
  params, cfg, pieces = released.from_released(sd, "nlvr2.th", 4)
  assert pieces["heads"] == ["nlvr2"] and cfg["nlvr2_head"] == "biattn"
  assert "attn1.in_proj_bias[64:128]" in {k for k, _, _ in pieces["dropped"]}
  back = released_export.to_released(params, cfg)
  for k, v in back.items():
    want = sd[k].copy()
    if k.endswith("in_proj_bias"):
      want[d : 2 * d] = 0
    np.testing.assert_array_equal(v, want, err_msg=k)
  rep = output.report(params, cfg, pieces, "nlvr2.th", ("nlvr2",))
  assert not rep["new"]
  head = nnx.eval_shape(lambda: BiAttentionHead(d, 4, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(head)
  nnx.replace_by_pure_dict(state, params["biattn"])
  head = nnx.merge(graphdef, state)
  h0, h1 = rng.standard_normal((2, 2, 45, d))
  v0 = np.ones((2, 45), bool)
  v1 = v0.copy()
  v0[0, 30:] = v1[1, 38:] = False
  got = np.asarray(head(*(jnp.asarray(a) for a in (h0, h1, v0, v1))))
  want = _np_biattn(h0, h1, v0, v1, _sd64(sd), 4)
  err = float(np.max(np.abs(got - want)))
  print(f"\nreleased NLVR2 head vs float64: {err:.2e}")
  assert err <= TOL64 and np.max(np.abs(want)) > 0.1


# --------------------------- released EVE: CLI, tokenizer, whole model


def _bpe_tokenizer_json(vocab_size):
  """A byte-level BPE with RoBERTa-style specials, `vocab_size` tokens."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  words = (
      "what color is the cat on the mat a red blue small large dog "
      "sitting left of right square circle how many are there"
  ).split()
  tok.train_from_iterator(
      [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 5, trainer
  )
  tok.post_processor = tokenizers.processors.RobertaProcessing(
      ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
  )
  return tok.to_str()


def test_hf_tokenizer_matches_transformers(tmp_path):
  """encode_batch = transformers' `tokenizer(q, padding="max_length",
  truncation=True, max_length=L)`, which the released code called."""
  from eve_jax.data.hf_tokenizer import HFTokenizer
  from eve_jax.data.tokenizer import Tokenizer, load_tokenizer

  tf = pytest.importorskip("transformers")
  text = _bpe_tokenizer_json(300)
  path = tmp_path / "tokenizer.json"
  path.write_text(text)
  tok = load_tokenizer(str(path))
  assert isinstance(tok, HFTokenizer)
  fast = tf.PreTrainedTokenizerFast(
      tokenizer_file=str(path),
      bos_token="<s>",
      eos_token="</s>",
      pad_token="<pad>",
      unk_token="<unk>",
      mask_token="<mask>",
  )
  qs = ["what color is the cat?", "how many " * 30 + "dogs", ""]
  for max_len in (40, 8):
    ids, valid = tok.encode_batch(qs, max_len)
    ref = fast(qs, padding="max_length", truncation=True, max_length=max_len)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(
        valid, np.asarray(ref["attention_mask"], bool)
    )
  assert ids[0, 0] == tok.cls_id == fast.bos_token_id
  assert tok.pad_id == fast.pad_token_id and tok.mask_id == fast.mask_token_id
  assert tok.vocab_size == len(fast)
  assert tok.decode(tok.encode_batch(qs, 40)[0][0]).strip() == qs[0]
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(
      again.encode_batch(qs, 40)[0], tok.encode_batch(qs, 40)[0]
  )
  # A run's copied DIR/tokenizer.model holding JSON is found by content;
  # a SentencePiece file still loads as before.
  copied = tmp_path / "tokenizer.model"
  copied.write_text(text)
  assert isinstance(load_tokenizer(str(copied)), HFTokenizer)
  spm = tmp_path / "spm.model"
  from eve_jax.data.tokenizer import shapes_tokenizer

  shapes_tokenizer(str(spm), vocab_size=64, num_captions=200)
  assert isinstance(load_tokenizer(str(spm)), Tokenizer)


def _np_model_vqa(sd, cfg, pixels, ids):
  """The released VQA model (mode 'vl', no padding), float64: the fused
  pass's normed states and the head on the text CLS."""
  _, states, _, n_image, _ = _np_pass(
      sd, cfg, pixels, ids, np.ones(ids.shape, bool)
  )
  return states, _np_vqa_head(sd, states[:, n_image])


def _np_vqa_head(sd, cls):
  h = cls @ sd["output.0.weight"].T + sd["output.0.bias"]
  h = _np_ln(h, sd["output.1.weight"], sd["output.1.bias"], eps=1e-5)
  from scipy.special import erf  # pylint: disable=g-import-not-at-top

  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return h @ sd["output.3.weight"].T + sd["output.3.bias"]


def _np_pass(sd, cfg, pixels=None, ids=None, atts=None):
  """One released backbone pass, float64, any batch and padding: mode
  'vl' with both inputs, 'vision' or 'text' with one. Every soft-router
  layer routes all B * L tokens of the pass as one group, padding
  included (the released MOELayer reshapes [B, L, D] to [B * L, D]).

  Returns:
    (states [B, L, D] before the final norm, after it, valid [B, L],
    number of image tokens, assignments dropped over all layers).
  """
  b = "backbone."
  d, p = cfg["width"], cfg["patch_size"]
  parts, valid = [], []
  if pixels is not None:
    img = pixels.astype(np.float64)
    bsz, hh, ww, _ = img.shape
    patches = (
        img.reshape(bsz, hh // p, p, ww // p, p, 3)
        .transpose(0, 1, 3, 5, 2, 4)
        .reshape(bsz, -1, 3 * p * p)
    )
    w = sd[b + "patch_embed.weight"].reshape(d, -1)
    vis = patches @ w.T + sd[b + "patch_embed.bias"]
    cls = np.broadcast_to(sd[b + "class_embedding_vision"], (bsz, 1, d))
    parts.append(
        np.concatenate([cls, vis], 1)
        + sd[b + "pos_embed_vision"]
        + sd[b + "type_embed_vision"]
    )
    valid.append(np.ones(parts[-1].shape[:2], bool))
  if ids is not None:
    txt = _np_ln(
        sd[b + "word_embedding.weight"][ids],
        sd[b + "layer_norm_text.weight"],
        sd[b + "layer_norm_text.bias"],
    )
    parts.append(
        txt
        + sd[b + "pos_embed_text"][: ids.shape[1]]
        + sd[b + "type_embed_text"]
    )
    valid.append(atts.astype(bool))
  n_image = parts[0].shape[1] if pixels is not None else 0
  x = _np_ln(
      np.concatenate(parts, 1),
      sd[b + "pre_layrnorm.weight"],
      sd[b + "pre_layrnorm.bias"],
  )
  valid = np.concatenate(valid, 1)
  dropped = 0
  for i in range(cfg["depth"]):
    x, n = _np_block(
        x,
        sd,
        i,
        cfg["heads"],
        n_image,
        x.shape[1] - n_image,
        valid,
        cfg["num_experts"],
    )
    dropped += n
  return (
      x,
      _np_ln(x, sd[b + "norm.weight"], sd[b + "norm.bias"]),
      valid,
      n_image,
      dropped,
  )


def test_released_cli_and_whole_model(tmp_path, capsys):
  """torch.save in the released layout -> `python -m eve_jax.convert eve`
  -> DIR (init_from's format, tokenizer.json) -> run: the fused states and
  VQA logits match the NumPy float64 released model."""
  torch = _torch()
  c = _SMALL
  sd = _released_sd(np.random.default_rng(3), **dict(c, vocab=300))
  ckpt = tmp_path / "eve_vqa.th"
  torch.save(
      {
          "model": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
          "epoch": 3,
      },
      ckpt,
  )
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  (tok_dir / "tokenizer.json").write_text(_bpe_tokenizer_json(300))
  answers = tmp_path / "answers.json"
  answers.write_text(json.dumps([f"ans{i}" for i in range(10)]))
  out = tmp_path / "converted"
  assert (
      main(
          [
              "eve",
              "--in",
              str(ckpt),
              "--tokenizer",
              str(tok_dir),
              "--out",
              str(out),
              "--answers",
              str(answers),
              "--heads",
              "4",
          ]
      )
      == 0
  )
  line = capsys.readouterr().out
  assert "released EVE (vqa)" in line and "dropped" in line
  for name in (
      "config.json",
      "tokenizer.json",
      "conversion_report.json",
      "answers.json",
      "checkpoints",
  ):
    assert os.path.exists(out / name), name
  rep = json.load(open(out / "conversion_report.json"))
  assert not rep["new"]  # everything the VQA model has came from the file
  assert rep["differences_from_released_code"]
  model, config = output.load(str(out))
  assert config["heads"] == ["vqa"]
  # One sample, 40 text tokens, no padding: released routing = eve_jax's.
  rng = np.random.default_rng(4)
  pixels = rng.uniform(-1, 1, (1, c["image"], c["image"], 3))
  ids = rng.integers(5, 300, (1, 40))
  sd64 = _sd64(sd)
  want_states, want_logits = _np_model_vqa(sd64, config["model"], pixels, ids)
  args = (
      jnp.asarray(pixels, jnp.float32),
      jnp.asarray(ids, jnp.int32),
      jnp.ones((1, 40), bool),
  )
  got = infer._outputs(model, *args)  # what `run` calls, jitted
  logits, _ = infer._call(model, *args)
  err_states = float(np.max(np.abs(np.asarray(got["states"]) - want_states)))
  err_logits = float(np.max(np.abs(np.asarray(logits) - want_logits)))
  print(
      f"\nreleased model vs float64: states {err_states:.2e}, VQA logits "
      f"{err_logits:.2e}"
  )
  assert err_states <= TOL64
  # The head's LayerNorm eps differs (1e-5 released, 1e-6 eve_jax).
  assert err_logits <= 1e-4
  capsys.readouterr()
  # The CLI `run` on a user's image and question.
  from PIL import Image

  img = tmp_path / "img.png"
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(img)
  npz = tmp_path / "out.npz"
  assert (
      main(
          [
              "run",
              "--model",
              str(out),
              "--image",
              str(img),
              "--text",
              "what color is the cat?",
              "--top",
              "3",
              "--save",
              str(npz),
          ]
      )
      == 0
  )
  summary = json.loads(capsys.readouterr().out)
  pair = summary["pairs"][0]
  assert len(pair["vqa"]) == 3 and pair["vqa"][0][0].startswith("ans")
  assert pair["tokens"][0] == "<s>"
  arrays = np.load(npz)
  assert arrays["states"].shape == (1, 5 + 40, 64)
  assert arrays["vqa_logits"].shape == (1, 10)
  # Another setting without editing config.json; a typo is one line.
  assert (
      main(
          [
              "run",
              "--model",
              str(out),
              "--image",
              str(img),
              "--text",
              "what color is the cat?",
              "--set",
              "model.capacity_factor=0",
              "--set",
              "model.moe_group=sample",
          ]
      )
      == 0
  )
  summary = json.loads(capsys.readouterr().out)
  assert summary["overrides"] == {"capacity_factor": 0, "moe_group": "sample"}
  assert (
      main(
          [
              "run",
              "--model",
              str(out),
              "--image",
              str(img),
              "--set",
              "model.moe_grup=sample",
          ]
      )
      == 1
  )
  err = capsys.readouterr().err
  assert "unknown keys ['moe_grup']" in err and err.count("\n") == 1
  assert (
      main(
          [
              "run",
              "--model",
              str(out),
              "--image",
              str(img),
              "--set",
              "capacity_factor=0",
          ]
      )
      == 1
  )
  assert "expected model.KEY=VALUE" in capsys.readouterr().err


def _with_head(sd, rng, head):
  """The released state dict `sd` (VQA head) as a `head` checkpoint."""
  sd = dict(sd)
  if head == "vqa":
    return sd
  for k in [k for k in sd if k.startswith("output.")]:
    del sd[k]
  d = sd["backbone.norm.weight"].shape[0]
  t = lambda *shape: (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(
      np.float32
  )
  if head == "retrieval":
    sd["itc_vision_proj_head.weight"] = t(d, d)
    sd["itc_text_proj_head.weight"] = t(d, d)
    sd["itc_temp"] = np.asarray(0.05, np.float32)
    sd["itm_head.weight"], sd["itm_head.bias"] = t(2, d), t(2)
  else:  # nlvr2, the --biattn head
    for a in ("attn1", "attn2"):
      sd[a + ".in_proj_weight"], sd[a + ".in_proj_bias"] = (
          t(3 * d, d),
          t(3 * d),
      )
      sd[a + ".out_proj.weight"], sd[a + ".out_proj.bias"] = t(d, d), t(d)
    sd["fc.0.weight"], sd["fc.0.bias"] = t(d, 2 * d), t(d)
    sd["attn_pool.fc.0.weight"] = t(1, d)
    sd["attn_pool.fc.0.bias"] = np.full((1,), 0.3, np.float32)
    sd["nlvr2_output.weight"], sd["nlvr2_output.bias"] = t(2, 2 * d), t(2)
  return sd


def test_released_batch_computation_matches_numpy_float64(tmp_path):
  """At the released settings (capacity factor 1.0, minimum capacity 4,
  a batch of 3 padded questions, tokens dropped), each converted model
  against the float64 NumPy forward of the released computation: VQA
  logits, ITC evaluation features (CLS before the final norm), ITM logits
  and NLVR2 logits within 1e-4, dropped assignments equal. Flipping the
  grouping switch back to eve_jax's own breaks the match."""
  c = _SMALL
  rng = np.random.default_rng(11)
  base = _released_sd(rng, **dict(c, vocab=300))
  # Gate rows that favour expert 0 for every token (through the shared
  # LayerNorm bias in front of the MoE), so capacity overflows.
  for i in range(c["depth"] - c["soft"], c["depth"]):
    p = f"backbone.encoder.layers.{i}."
    bias = base[p + "norm2_vl.bias"]
    base[p + "mlp_moe.moe.gate.wg.weight"][0] += 4 * bias / np.linalg.norm(bias)
  n_text = 40
  pixels = rng.uniform(-1, 1, (3, c["image"], c["image"], 3))
  pixels1 = rng.uniform(-1, 1, (3, c["image"], c["image"], 3))
  ids = rng.integers(5, 300, (3, n_text))
  atts = np.zeros((3, n_text), np.int64)
  for row, n in enumerate((7, 19, 40)):
    atts[row, :n] = 1
  ids = np.where(atts == 1, ids, 1)  # <pad>
  j = lambda a, dt=jnp.float32: jnp.asarray(a, dt)  # noqa: E731
  jargs = (j(pixels), j(ids, jnp.int32), j(atts, bool))
  models, sds = {}, {}
  for head in ("vqa", "retrieval", "nlvr2"):
    sd = _with_head(base, np.random.default_rng(12), head)
    params, cfg, pieces = released.from_released(sd, f"{head}.th", 4)
    assert cfg["moe_group"] == "batch" and cfg["moe_min_capacity"] == 4
    config = {"model": cfg, "heads": pieces["heads"]}
    if head == "vqa":
      config["vqa_answers"] = pieces["vqa_answers"]
    output.write(str(tmp_path / head), params, config, {})
    models[head] = output.load(str(tmp_path / head))[0]
    sds[head] = _sd64(sd)
  cfg = models["vqa"].backbone.cfg.__dict__
  errs, drops = {}, {}

  # VQA logits.
  _, normed, _, n_image, want_drop = _np_pass(
      sds["vqa"], cfg, pixels, ids, atts
  )
  want_vqa = _np_vqa_head(sds["vqa"], normed[:, n_image])
  logits, stats = nnx.jit(lambda m, *a: m(*a))(models["vqa"], *jargs)
  errs["vqa"] = float(np.max(np.abs(np.asarray(logits) - want_vqa)))
  drops["vqa"] = (sum(int(st.dropped) for st in stats), want_drop)

  # ITC evaluation features: unimodal passes, CLS before the final norm.
  m, sd = models["retrieval"], sds["retrieval"]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa
  raw = _np_pass(sd, cfg, pixels=pixels)[0]
  want_img = unit(raw[:, 0] @ sd["itc_vision_proj_head.weight"].T)
  raw = _np_pass(sd, cfg, ids=ids, atts=atts)[0]
  want_txt = unit(raw[:, 0] @ sd["itc_text_proj_head.weight"].T)
  got_img = nnx.jit(lambda m, x: m.matching.image_proj(m.image_features(x)))(
      m, jargs[0]
  )
  got_txt = nnx.jit(
      lambda m, a, b: m.matching.text_proj(m.text_features(a, b))
  )(m, *jargs[1:])
  errs["itc"] = max(
      float(np.max(np.abs(unit(np.asarray(got_img)) - want_img))),
      float(np.max(np.abs(unit(np.asarray(got_txt)) - want_txt))),
  )
  # ITM logits on the fused pass (normed states, text CLS).
  _, normed, _, n_image, want_drop = _np_pass(sd, cfg, pixels, ids, atts)
  want = normed[:, n_image] @ sd["itm_head.weight"].T + sd["itm_head.bias"]

  def itm(m, *a):
    states, _, st = task_models.fused(m.backbone, *a, None)
    return m.matching.match_logits(states[:, n_image]), st

  got, stats = nnx.jit(itm)(m, *jargs)
  errs["itm"] = float(np.max(np.abs(np.asarray(got) - want)))
  drops["itm"] = (sum(int(st.dropped) for st in stats), want_drop)

  # NLVR2: two passes (one routing group each), the bi-attention head.
  sd = sds["nlvr2"]
  _, h0, v0, _, d0 = _np_pass(sd, cfg, pixels, ids, atts)
  _, h1, v1, _, d1 = _np_pass(sd, cfg, pixels1, ids, atts)
  want = _np_biattn(h0, h1, v0, v1, sd, cfg["heads"])
  got, stats = nnx.jit(lambda m, *a: m(*a))(
      models["nlvr2"], jargs[0], j(pixels1), *jargs[1:]
  )
  errs["nlvr2"] = float(np.max(np.abs(np.asarray(got) - want)))
  drops["nlvr2"] = (sum(int(st.dropped) for st in stats), d0 + d1)

  # eve_jax's own grouping on the same weights and inputs.
  flipped = output.load(
      str(tmp_path / "vqa"), overrides={"moe_group": "sample"}
  )[0]
  logits_s, _ = nnx.jit(lambda m, *a: m(*a))(flipped, *jargs)
  err_flipped = float(np.max(np.abs(np.asarray(logits_s) - want_vqa)))
  print(
      f"\nreleased batch computation vs float64: "
      + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
      + f"; dropped (eve_jax, reference) {drops}; moe_group=sample: VQA "
      f"logits off by {err_flipped:.3f}"
  )
  for name, (got_drop, want_drop) in drops.items():
    assert got_drop == want_drop > 0, name
  assert max(errs.values()) <= 1e-4, errs
  assert err_flipped > 1e-2


def test_released_cli_vocab_mismatch(tmp_path, capsys):
  torch = _torch()
  sd = _released_sd(np.random.default_rng(3), **_SMALL)  # vocab 100
  ckpt = tmp_path / "eve.th"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, ckpt)
  tok = tmp_path / "tokenizer.json"
  tok.write_text(_bpe_tokenizer_json(300))
  assert (
      main(
          [
              "eve",
              "--in",
              str(ckpt),
              "--tokenizer",
              str(tok),
              "--out",
              str(tmp_path / "o"),
              "--heads",
              "4",
          ]
      )
      == 1
  )
  err = capsys.readouterr().err
  assert "has 300 tokens but" in err and "100 rows" in err
  assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_released_heads_are_told_not_guessed(tmp_path, capsys):
  """The weights do not say the attention heads: --heads, else the
  checkpoint's own config, else the released sizes (768: 12, 1024: 16);
  any other width without either is refused in one line."""
  torch = _torch()
  assert released.released_heads(768) == (
      12,
      "the released config of " "width 768",
  )
  assert released.released_heads(1024)[0] == 16
  assert (
      released.released_heads(
          64, checkpoint_config={"vlmo_config": {"num_attention_heads": 8}}
      )[0]
      == 8
  )
  with pytest.raises(ConversionError, match="does not divide"):
    released.released_heads(64, 5)
  sd = _released_sd(np.random.default_rng(3), **dict(_SMALL, vocab=300))
  ckpt = tmp_path / "eve.th"
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  torch.save({"model": tensors}, ckpt)
  tok = tmp_path / "tokenizer.json"
  tok.write_text(_bpe_tokenizer_json(300))
  args = ["eve", "--in", str(ckpt), "--tokenizer", str(tok), "--out"]
  assert main(args + [str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert "width 64 is not a released EVE size" in err and "--heads" in err
  assert err.count("\n") == 1
  torch.save({"model": tensors, "config": {"num_attention_heads": 4}}, ckpt)
  assert main(args + [str(tmp_path / "o")]) == 0
  rep = json.load(open(tmp_path / "o" / "conversion_report.json"))
  assert rep["attention_heads"] == [4, "the checkpoint's config"]
  assert rep["model"]["heads"] == 4


def test_init_from_accepts_converted_dir(tmp_path):
  """pretrained.load_params / match read a converted DIR like a run's."""
  from eve_jax import pretrained

  sd = _released_sd(np.random.default_rng(5), **_SMALL)
  params, cfg, pieces = released.from_released(sd, "eve.th", 4)
  rep = output.report(params, cfg, pieces, "eve.th", ("vqa",), 10)
  output.write(
      str(tmp_path),
      params,
      {"model": cfg, "heads": ["vqa"], "vqa_answers": 10},
      rep,
  )
  loaded, step = pretrained.load_params(str(tmp_path))
  assert step == 0
  flat = layout.flatten(params)
  got = layout.flatten(loaded)
  assert set(got) == set(flat)
  for k in flat:
    np.testing.assert_array_equal(got[k], flat[k])
  # A fine-tuning model with another answer count: the head is named.
  target = nnx.to_pure_dict(
      nnx.state(
          output.build(
              ModelConfig.from_config(cfg), ("vqa",), 12, abstract=True
          ),
          nnx.Param,
      )
  )
  with pytest.raises(pretrained.InitError, match="vqa_head/fc2/bias"):
    pretrained.match(target, loaded, cfg, ModelConfig.from_config(cfg))
