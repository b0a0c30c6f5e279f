"""eve_jax parameters -> the released EVE layout (the inverse of
`released.from_released`, eve_jax/convert/released.py, which documents the
layout)."""

from __future__ import annotations

from typing import Any

import numpy as np

from eve_jax.convert import layout
from eve_jax.convert.released import BACKBONE, LAYER, MOE
from eve_jax.model.variants import parse_ffn_plan


def to_released(params: dict, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  """eve_jax params (as `from_released` returns them) -> the released
  state dict (the tensors it maps)."""
  n_soft = cfg["num_soft_layers"]
  eve_layout = ("hard",) * (cfg["depth"] - n_soft) + ("soft",) * n_soft
  if cfg.get("ffn_plan") and parse_ffn_plan(cfg["ffn_plan"]) != eve_layout:
    raise ValueError(
        f"model.ffn_plan={cfg['ffn_plan']!r}: the released layout has "
        "EVE's blocks only (hard below, soft on top)"
    )
  bb = params["backbone"]
  sd = {}

  def ln(key, p):
    sd[key + ".weight"], sd[key + ".bias"] = p["scale"], p["bias"]

  def lin(key, w, b=None):
    sd[key + ".weight"] = w
    if b is not None:
      sd[key + ".bias"] = b

  ie, te = bb["image_embed"], bb["text_embed"]
  sd[BACKBONE + "patch_embed.weight"] = layout.patch_weight(ie["patch_kernel"])
  sd[BACKBONE + "patch_embed.bias"] = ie["patch_bias"]
  sd[BACKBONE + "class_embedding_vision"] = ie["cls_token"]
  sd[BACKBONE + "pos_embed_vision"] = ie["pos_embed"]
  sd[BACKBONE + "word_embedding.weight"] = te["word_embed"]
  ln(BACKBONE + "layer_norm_text", te["norm"])
  sd[BACKBONE + "pos_embed_text"] = te["pos_embed"]
  sd[BACKBONE + "type_embed_vision"] = bb["type_embed"][0]
  sd[BACKBONE + "type_embed_text"] = bb["type_embed"][1]
  ln(BACKBONE + "pre_layrnorm", bb["pre_norm"])
  ln(BACKBONE + "norm", bb["norm"])
  for i in range(cfg["depth"]):
    b, blk = LAYER.format(i=i), bb["blocks"][i]
    q_w, k_w, v_w, q_b, v_b, o_w, o_b = layout.attention_torch(blk["attn"])
    sd[b + "attn.qkv.weight"] = np.concatenate([q_w, k_w, v_w])
    sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = q_b, v_b
    lin(b + "attn.proj", o_w, o_b)
    ln(b + "norm1", blk["norm1"])
    sd[b + "gamma_1"], sd[b + "gamma_2"] = blk["gamma_1"], blk["gamma_2"]
    ffn = blk["ffn"]
    if i >= cfg["depth"] - cfg["num_soft_layers"]:
      m = b + MOE
      ln(b + "norm2_vl", blk["norm2"])
      sd[m + "gate.wg.weight"] = np.ascontiguousarray(ffn["kernel"].T)
      sd[m + "vision_embed"] = ffn["modality_embed"][0]
      sd[m + "text_embed"] = ffn["modality_embed"][1]
      for j in range(ffn["wi"].shape[0]):
        w1, b1, w2, b2 = layout.ffn_torch(ffn, j)
        lin(f"{m}experts.experts.{j}.fc1", w1, b1)
        lin(f"{m}experts.experts.{j}.fc2", w2, b2)
    else:
      for j, s in enumerate(("imag", "text")):
        sd[b + f"norm2_{s}.weight"] = ffn["norm_scale"][j]
        sd[b + f"norm2_{s}.bias"] = ffn["norm_bias"][j]
        w1, b1, w2, b2 = layout.ffn_torch(ffn, j)
        lin(b + f"mlp_{s}.fc1", w1, b1)
        lin(b + f"mlp_{s}.fc2", w2, b2)
  if "vqa_head" in params:
    v = params["vqa_head"]
    lin("output.0", layout.linear_in(v["fc1"]["kernel"]), v["fc1"]["bias"])
    ln("output.1", v["norm"])
    lin("output.3", layout.linear_in(v["fc2"]["kernel"]), v["fc2"]["bias"])
  if "biattn" in params:
    ba = params["biattn"]
    for name in ("attn1", "attn2"):
      q_w, k_w, v_w, q_b, v_b, o_w, o_b = layout.attention_torch(ba[name])
      sd[name + ".in_proj_weight"] = np.concatenate([q_w, k_w, v_w])
      sd[name + ".in_proj_bias"] = np.concatenate(
          [q_b, np.zeros_like(q_b), v_b]
      )  # the k bias it dropped
      lin(name + ".out_proj", o_w, o_b)
    for name, key in (
        ("fc", "fc.0"),
        ("pool", "attn_pool.fc.0"),
        ("output", "nlvr2_output"),
    ):
      lin(key, layout.linear_in(ba[name]["kernel"]), ba[name]["bias"])
  if "matching" in params:
    mt = params["matching"]
    lin("itc_vision_proj_head", layout.linear_in(mt["image_proj"]["kernel"]))
    lin("itc_text_proj_head", layout.linear_in(mt["text_proj"]["kernel"]))
    sd["itc_temp"] = mt["temp"]
    lin("itm_head", layout.linear_in(mt["itm"]["kernel"]), mt["itm"]["bias"])
  return sd
