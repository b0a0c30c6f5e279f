"""BEiT / BEiTv2 image encoders -> the eve_jax backbone.

Three layouts are read (`detect_layout`):
  hf      Hugging Face `BeitModel` (transformers >= 5: `layers.{i}.attention.
          q_proj`, `lambda_1`, `mlp.fc1`, ...; optionally under `beit.`);
  hf_v4   the same model as published on the hub by transformers 4
          (`encoder.layer.{i}.attention.attention.query`, `intermediate.
          dense`, ...);
  unilm   unilm's BEiTv2 pretraining files (`*_pt1k.pth`, under `model` or
          `module`; a shared `rel_pos_bias`; `cls_pt_layers`, `lm_head`);
  timm    timm's `beitv2_*` state dicts (per-block relative position bias,
          `fc_norm` / `head`).
(unilm and timm name their blocks alike: `blocks.{i}.attn.qkv.weight`.)

Each block maps onto an eve_jax block: attention q, k, v (a fused qkv
weight [3D, D] is split; q and v biases; BEiT has no k bias), layer scale
gamma_1/gamma_2, norm1, and the FFN copied into both hard-router FFNs
(image and text, each with norm2) or into every soft-router expert (norm2
before the MoE). Relative position bias has no counterpart in eve_jax: it
is dropped, and the absolute positions eve_jax uses are left for the model
to initialize; the report says so.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from eve_jax.convert import layout
from eve_jax.convert.source import ConversionError, Source
from eve_jax.model.variants import VARIANTS

_REL = (
    "relative position bias: no counterpart in eve_jax (absolute "
    "position embeddings are initialized instead)"
)

# Per layout: the name of each tensor. `{i}` is the block index.
_NAMES = {
    "hf": dict(
        cls="embeddings.cls_token",
        pos="embeddings.position_embeddings",
        patch="embeddings.patch_embeddings.projection",
        block="layers.{i}.",
        norm1="layernorm_before",
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        proj="attention.o_proj",
        gamma_1="lambda_1",
        gamma_2="lambda_2",
        norm2="layernorm_after",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        norm="layernorm",
    ),
    "hf_v4": dict(
        cls="embeddings.cls_token",
        pos="embeddings.position_embeddings",
        patch="embeddings.patch_embeddings.projection",
        block="encoder.layer.{i}.",
        norm1="layernorm_before",
        q="attention.attention.query",
        k="attention.attention.key",
        v="attention.attention.value",
        proj="attention.output.dense",
        gamma_1="lambda_1",
        gamma_2="lambda_2",
        norm2="layernorm_after",
        fc1="intermediate.dense",
        fc2="output.dense",
        norm="layernorm",
    ),
    "timm": dict(
        cls="cls_token",
        pos="pos_embed",
        patch="patch_embed.proj",
        block="blocks.{i}.",
        norm1="norm1",
        qkv="attn.qkv",
        q_bias="attn.q_bias",
        v_bias="attn.v_bias",
        proj="attn.proj",
        gamma_1="gamma_1",
        gamma_2="gamma_2",
        norm2="norm2",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        norm="norm",
    ),
}
_NAMES["unilm"] = _NAMES["timm"]

# Tensors with no counterpart, per layout: (regex, why).
_DROP = {
    "hf": [
        (r"layers\.\d+\.relative_position_bias\..*", _REL),
        (r"shared_position_bias\..*", _REL),
        (r"embeddings\.mask_token", "MIM mask token of BEiT pretraining"),
        (r"pooler\..*", "BEiT's mean-pooling head"),
        (r"classifier\..*", "ImageNet classifier"),
        (r"lm_head\..*|layernorm_mim\..*", "BEiT's masked-image-modeling head"),
    ],
    "hf_v4": [
        (
            r"encoder\.layer\.\d+\.attention\.attention\."
            r"relative_position_(bias\..*|index)",
            _REL,
        ),
        (r"encoder\.relative_position_bias\..*", _REL),
        (r"embeddings\.mask_token", "MIM mask token of BEiT pretraining"),
        (r"pooler\..*", "BEiT's mean-pooling head"),
        (r"classifier\..*", "ImageNet classifier"),
        (r"lm_head\..*", "BEiT's masked-image-modeling head"),
    ],
    "timm": [
        (r"blocks\.\d+\.attn\.relative_position_(bias_table|index)", _REL),
        (r"rel_pos_bias\..*", _REL),
        (
            r"blocks\.\d+\.attn\.k_bias",
            "k bias: shifts each query's logits equally, cancels in " "softmax",
        ),
        (
            r"fc_norm\..*",
            "timm's mean-pooling LayerNorm (the " "classification head)",
        ),
        (r"head\..*", "ImageNet classifier"),
    ],
}
_DROP["unilm"] = _DROP["timm"] + [
    (r"mask_token", "MIM mask token of BEiTv2 pretraining"),
    (
        r"lm_head\..*|norm_lm\..*|cls_pt_layers\..*|cls_pt_norm\..*",
        "BEiTv2 pretraining heads (masked-image-modeling and CLS-pretraining "
        "layers)",
    ),
]
_HF_PREFIXES = ("beit.", "model.", "module.")
_OUTSIDE = "<outside the backbone>/"


def detect_layout(sd: dict[str, Any], path: str) -> tuple[str, dict]:
  """(layout name, state dict with any model prefix removed)."""
  for prefix in ("",) + _HF_PREFIXES:
    keys = {k[len(prefix) :] for k in sd if k.startswith(prefix)}
    if any(
        re.fullmatch(r"layers\.\d+\.attention\.q_proj\.weight", k) for k in keys
    ):
      name = "hf"
    elif any(
        re.fullmatch(
            r"encoder\.layer\.\d+\.attention\.attention\." r"query\.weight", k
        )
        for k in keys
    ):
      name = "hf_v4"
    elif any(re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k) for k in keys):
      name = (
          "unilm"
          if any(
              k.startswith(("cls_pt_layers.", "lm_head.")) or k == "mask_token"
              for k in keys
          )
          else "timm"
      )
    else:
      continue
    # Tensors outside the prefix (HF's lm_head, classifier, MIM layernorm)
    # are task heads: kept under a marker that `convert` drops.
    out = {
        (k[len(prefix) :] if k.startswith(prefix) else _OUTSIDE + k): v
        for k, v in sd.items()
    }
    return name, out
  raise ConversionError(
      f"{path}: not a BEiT state dict (no "
      "layers.0.attention.q_proj, encoder.layer.0.attention."
      "attention.query or blocks.0.attn.qkv weight)"
  )


def _heads(sd: dict, width: int, heads: int | None) -> int:
  """From a relative position bias table [num_rel, H] when there is one."""
  for k, v in sd.items():
    if k.endswith("relative_position_bias_table") and v.ndim == 2:
      if heads is not None and heads != v.shape[1]:
        raise ConversionError(
            f"--heads={heads} but {k} has {v.shape[1]} " "heads"
        )
      return int(v.shape[1])
  return heads or max(width // 64, 1)


def _grid_from_rel(sd: dict) -> int | None:
  for k, v in sd.items():
    if k.endswith("relative_position_bias_table") and v.ndim == 2:
      side = int(round(((v.shape[0] - 3) ** 0.5 + 1) / 2))
      if (2 * side - 1) ** 2 + 3 == v.shape[0]:
        return side
  return None


def model_config(
    sd: dict,
    names: dict,
    path: str,
    *,
    heads: int | None = None,
    image_size: int | None = None,
    num_soft_layers: int | None = None,
    num_experts: int | None = None,
) -> dict[str, Any]:
  """The eve_jax `config.model` a BEiT state dict implies."""
  depth = 1 + max(
      int(m.group(1))
      for k in sd
      if (
          m := re.match(
              re.escape(names["block"]).replace(r"\{i\}", r"(\d+)"), k
          )
      )
  )
  patch_w = sd.get(names["patch"] + ".weight")
  if patch_w is None or patch_w.ndim != 4:
    raise ConversionError(
        f"{path}: missing {names['patch']}.weight (a conv "
        "weight [D, 3, P, P])"
    )
  width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
  fc1 = sd.get(names["block"].format(i=0) + names["fc1"] + ".weight")
  if fc1 is None:
    raise ConversionError(
        f"{path}: missing {names['block'].format(i=0)}" f"{names['fc1']}.weight"
    )
  if image_size is None:
    pos = sd.get(names["pos"])
    grid = (
        int(round((pos.reshape(-1, width).shape[0] - 1) ** 0.5))
        if pos is not None
        else _grid_from_rel(sd)
    )
    image_size = patch * grid if grid else 224
  variant = next(
      (
          v
          for v, t in VARIANTS.items()
          if t["depth"] == depth and t["width"] == width
      ),
      "base",
  )
  base = VARIANTS[variant]
  return dict(
      variant=variant,
      depth=depth,
      width=width,
      heads=_heads(sd, width, heads),
      mlp_dim=int(fc1.shape[0]),
      image_size=image_size,
      patch_size=patch,
      num_soft_layers=(
          base["num_soft_layers"]
          if num_soft_layers is None
          else num_soft_layers
      ),
      num_experts=base["num_experts"] if num_experts is None else num_experts,
      activation="gelu",
      # Renormalized top-2 gates over experts that are all the same FFN
      # give exactly BEiT's FFN output (see the report).
      moe_normalize_gates=True,
  )


def convert(
    sd: dict[str, np.ndarray],
    path: str,
    *,
    heads: int | None = None,
    image_size: int | None = None,
    num_soft_layers: int | None = None,
    num_experts: int | None = None,
    drop: Sequence[str] = (),
) -> tuple[dict, dict[str, Any], dict[str, Any]]:
  """A BEiT state dict -> (eve_jax params {"backbone": ...}, config.model
  dict, report pieces {"layout", "dropped", "initialized"})."""
  name, sd = detect_layout(sd, path)
  n = _NAMES[name]
  cfg = model_config(
      sd,
      n,
      path,
      heads=heads,
      image_size=image_size,
      num_soft_layers=num_soft_layers,
      num_experts=num_experts,
  )
  src = Source(sd, path)
  for pattern, why in _DROP[name]:
    src.drop_matching(pattern, why)
  src.drop_matching(
      re.escape(_OUTSIDE) + ".*", "a task head outside the " "BEiT backbone"
  )
  src.drop_prefixes(drop)
  d, f, h = cfg["width"], cfg["mlp_dim"], cfg["heads"]
  p = cfg["patch_size"]
  take = src.take

  def ln(key):
    return layout.norm(take(key + ".weight", (d,)), take(key + ".bias", (d,)))

  cls = take(n["cls"], (1, 1, d))
  image_embed = {
      "patch_kernel": layout.patch_kernel(
          take(n["patch"] + ".weight", (d, 3, p, p))
      ),
      "patch_bias": take(n["patch"] + ".bias", (d,)),
      "cls_token": cls.reshape(d),
  }
  initialized = []
  if n["pos"] in sd:
    grid = (cfg["image_size"] // p) ** 2
    image_embed["pos_embed"] = take(n["pos"], (1, 1 + grid, d))[0]
  else:
    initialized.append(
        [
            "backbone/image_embed/pos_embed",
            "left to the model's initialization: " + _REL,
        ]
    )
  blocks = {}
  for i in range(cfg["depth"]):
    b = n["block"].format(i=i)
    t = f"backbone/blocks/{i}"
    if "qkv" in n:
      qkv = take(b + n["qkv"] + ".weight", (3 * d, d))
      q_w, k_w, v_w = qkv[:d], qkv[d : 2 * d], qkv[2 * d :]
      q_b = take(b + n["q_bias"], (d,))
      v_b = take(b + n["v_bias"], (d,))
    else:
      q_w = take(b + n["q"] + ".weight", (d, d))
      k_w = take(b + n["k"] + ".weight", (d, d))
      v_w = take(b + n["v"] + ".weight", (d, d))
      q_b = take(b + n["q"] + ".bias", (d,))
      v_b = take(b + n["v"] + ".bias", (d,))
      src.drop(
          b + n["k"] + ".bias",
          "k bias: shifts each query's logits equally, cancels in " "softmax",
      )
    attn = layout.attention(
        q_w,
        k_w,
        v_w,
        q_b,
        v_b,
        take(b + n["proj"] + ".weight", (d, d)),
        take(b + n["proj"] + ".bias", (d,)),
        h,
    )
    norm2 = (
        take(b + n["norm2"] + ".weight", (d,)),
        take(b + n["norm2"] + ".bias", (d,)),
    )
    fc1 = (
        take(b + n["fc1"] + ".weight", (f, d)),
        take(b + n["fc1"] + ".bias", (f,)),
    )
    fc2 = (
        take(b + n["fc2"] + ".weight", (d, f)),
        take(b + n["fc2"] + ".bias", (d,)),
    )
    block = {
        "norm1": ln(b + n["norm1"]),
        "attn": attn,
        "gamma_1": take(b + n["gamma_1"], (d,)),
        "gamma_2": take(b + n["gamma_2"], (d,)),
    }
    if i >= cfg["depth"] - cfg["num_soft_layers"]:
      e = cfg["num_experts"]
      block["norm2"] = layout.norm(*norm2)
      # The router is new (left to the model); zero modality embeddings
      # make every expert see BEiT's own FFN input.
      block["ffn"] = {
          "modality_embed": np.zeros((2, d), np.float32),
          **layout.experts([fc1] * e, [fc2] * e),
      }
      initialized.append(
          [
              f"{t}/ffn/modality_embed",
              "zeros, so every expert sees BEiT's FFN input",
          ]
      )
    else:
      block["ffn"] = layout.hard_ffn([norm2] * 2, [fc1] * 2, [fc2] * 2)
    blocks[i] = block
  backbone = {"image_embed": image_embed, "blocks": blocks}
  if n["norm"] + ".weight" in sd:
    backbone["norm"] = ln(n["norm"])
  else:
    initialized.append(
        [
            "backbone/norm",
            "left to the model's "
            "initialization (identity: the checkpoint has no "
            "final norm, timm's fc_norm models)",
        ]
    )
  src.check_all_used()
  return (
      {"backbone": backbone},
      cfg,
      {
          "layout": name,
          "dropped": src.dropped_report(),
          "initialized": initialized,
      },
  )
