"""The released EVE weights (PyTorch, github.com/ssyze/EVE) <-> eve_jax.

Layout (prefix `backbone.`): `patch_embed` (conv), `class_embedding_vision`,
`type_embed_vision`, `pos_embed_vision` [1 + N, D], `word_embedding`,
`layer_norm_text`, `pos_embed_text` [196, D], `type_embed_text`,
`pre_layrnorm`, `norm`; per layer `encoder.layers.{i}.`: `norm1`,
`attn.qkv.weight` [3D, D] (no bias: `attn.q_bias`, `attn.v_bias`, k gets
zeros), `attn.proj`, `gamma_1`, `gamma_2`, then either `norm2_imag` +
`mlp_imag` and `norm2_text` + `mlp_text` (hard router) or `norm2_vl` +
`mlp_moe.moe.gate.wg.weight` [E, D] + `mlp_moe.moe.experts.experts.{e}.
fc1/fc2` + `mlp_moe.moe.vision_embed` / `text_embed` [D] (soft router).
Heads: VQA `output.0` Linear(D, 2D), `output.1` LayerNorm, `output.3`
Linear(2D, answers); retrieval `itc_vision_proj_head`, `itc_text_proj_head`
(no bias), `itc_temp`, `itm_head`; NLVR2 (`--biattn`) `attn1`, `attn2`
(nn.MultiheadAttention), `fc.0`, `attn_pool.fc.0`, `nlvr2_output`
(eve_jax's `BiAttentionHead`, `model.nlvr2_head="biattn"`).

`from_released` and `to_released` (eve_jax/convert/released_export.py)
are exact inverses on every tensor they map. What the released code computes differently from eve_jax is listed in
`DIFFERENCES` (and in every conversion report).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from eve_jax.convert import layout
from eve_jax.convert.source import ConversionError, Source
from eve_jax.model.variants import VARIANTS

BACKBONE = "backbone."
LAYER = BACKBONE + "encoder.layers.{i}."
MOE = "mlp_moe.moe."

DIFFERENCES = [
    "soft router, second choice: the released top2gating adds Gumbel noise "
    "to the logits before picking each token's 2nd expert, in training AND "
    "at inference, so its outputs are random; eve_jax takes the 2nd-largest "
    "logit (the noise-free choice). Not reproducible; everything else is, "
    "with the config.model this converter writes:",
    "soft router, groups and capacity: moe_group='batch' (all B * L tokens "
    "of a pass are one routing group), moe_route_padding=true (padding "
    "tokens take expert slots), moe_min_capacity=4, capacity_factor 1.0, "
    "moe_normalize_gates: the released DeepSpeed layer. Results then depend "
    "on the batch size of each pass, as the released ones do (its VQA "
    "batch_size_test, retrieval batch_size_test_text and k_test); "
    "eve_jax's own default groups one sample and never routes padding",
    "VQA head LayerNorm: released eps 1e-5 (torch default): vqa_head_eps",
    "retrieval: the released forward_eval takes image/text CLS features "
    "before the final `norm`, its training after it: "
    "retrieval_eval_features='pre_norm' for retrieval checkpoints",
    "modality split: released layers split [image ; text] by position "
    "(hard router: the last 40 tokens are text; soft router: the first "
    "1 + N are image), eve_jax by explicit modality ids: the same for "
    "image + 40 text tokens, image-only and text-only passes",
]

# Tensors with no eve_jax counterpart: (regex, why).
_DROP = [
    (r"backbone\.position_ids_(vision|text)", "buffer: position ids"),
    (r"backbone\.mask_embed_vision", "pretraining mask token"),
    (
        r"itc_vl_(vision|text)_proj_head\.weight",
        "unused by the released forward (its 'vl' ITC heads)",
    ),
]


def _layers(sd: dict) -> int:
  idx = [
      int(m.group(1))
      for k in sd
      if (m := re.match(r"backbone\.encoder\.layers\.(\d+)\.", k))
  ]
  if not idx:
    raise ConversionError(
        "no backbone.encoder.layers.{i}.* tensors: not a "
        "released EVE checkpoint"
    )
  return 1 + max(idx)


# The released model configs (configs/config_vlmo{B,L}_base64k.json of the
# released code): num_attention_heads by vision_width. The weights do not
# tell the head count (no relative position table), and any other split of
# the width converts without error into a model that computes something
# else (0.79 logit error measured on a wrong guess).
RELEASED_HEADS = {768: 12, 1024: 16}


def released_heads(
    width: int,
    heads: int | None = None,
    checkpoint_config: Any = None,
    path: str = "",
) -> tuple[int, str]:
  """(attention heads, where the number came from) for a released model.

  In order: `heads` (--heads); `num_attention_heads` in the checkpoint's
  own "config" entry (or a dict in it, e.g. an inlined vlmo_config); the
  released configs for widths 768 and 1024. Anything else is a one-line
  ConversionError asking for --heads.
  """
  if heads is not None:
    if heads < 1 or width % heads:
      raise ConversionError(
          f"--heads={heads} does not divide the width " f"{width}"
      )
    return heads, "--heads"
  found = _config_heads(checkpoint_config)
  if found is not None:
    if width % found:
      raise ConversionError(
          f"{path}: its config's num_attention_heads="
          f"{found} does not divide the width {width}"
      )
    return found, "the checkpoint's config"
  if width in RELEASED_HEADS:
    return RELEASED_HEADS[width], f"the released config of width {width}"
  raise ConversionError(
      f"{path}: width {width} is not a released EVE size "
      f"({sorted(RELEASED_HEADS)}) and the checkpoint does "
      "not say its attention heads: pass --heads"
  )


def _config_heads(config: Any) -> int | None:
  if not isinstance(config, dict):
    return None
  if isinstance(config.get("num_attention_heads"), int):
    return int(config["num_attention_heads"])
  for v in config.values():
    if isinstance(v, dict) and (h := _config_heads(v)) is not None:
      return h
  return None


def model_config(
    sd: dict, path: str, heads: int | None = None, checkpoint_config: Any = None
) -> dict[str, Any]:
  """The eve_jax `config.model` a released state dict implies (`heads`,
  `checkpoint_config`: see `released_heads`)."""
  need = [
      BACKBONE + "class_embedding_vision",
      BACKBONE + "patch_embed.weight",
      BACKBONE + "word_embedding.weight",
      BACKBONE + "pos_embed_text",
      BACKBONE + "pos_embed_vision",
      LAYER.format(i=0) + "norm1.weight",
  ]
  for k in need:
    if k not in sd:
      raise ConversionError(
          f"{path}: missing {k}: not a released EVE " "checkpoint"
      )
  depth = _layers(sd)
  width = int(sd[BACKBONE + "class_embedding_vision"].shape[-1])
  patch = int(sd[BACKBONE + "patch_embed.weight"].shape[-1])
  grid = int(round((sd[BACKBONE + "pos_embed_vision"].shape[0] - 1) ** 0.5))
  soft = [
      i
      for i in range(depth)
      if LAYER.format(i=i) + MOE + "gate.wg.weight" in sd
  ]
  if soft != list(range(depth - len(soft), depth)):
    raise ConversionError(
        f"{path}: soft-router layers {soft} are not the "
        "top ones: eve_jax puts them in the top "
        "num_soft_layers blocks"
    )
  hard0 = LAYER.format(i=0) + "mlp_imag.fc1.weight"
  first = (
      LAYER.format(i=soft[0]) + MOE + "experts.experts.0.fc1.weight"
      if soft
      else hard0
  )
  if first not in sd:
    raise ConversionError(f"{path}: missing {first}")
  variant = next(
      (
          v
          for v, t in VARIANTS.items()
          if t["depth"] == depth and t["width"] == width
      ),
      "base",
  )
  return dict(
      variant=variant,
      depth=depth,
      width=width,
      heads=released_heads(width, heads, checkpoint_config, path)[0],
      mlp_dim=int(sd[first].shape[0]),
      num_soft_layers=len(soft),
      num_experts=(
          int(sd[LAYER.format(i=soft[0]) + MOE + "gate.wg.weight"].shape[0])
          if soft
          else VARIANTS[variant]["num_experts"]
      ),
      top_k=2,
      capacity_factor=1.0,
      add_modality_to_experts=True,
      moe_normalize_gates=True,
      activation="quick_gelu",
      # The released DeepSpeed layer (DIFFERENCES).
      moe_group="batch",
      moe_route_padding=True,
      moe_min_capacity=4,
      vqa_head_eps=1e-5,
      image_size=grid * patch,
      patch_size=patch,
      vocab_size=int(sd[BACKBONE + "word_embedding.weight"].shape[0]),
      max_text_len=40,
      max_text_positions=int(sd[BACKBONE + "pos_embed_text"].shape[0]),
  )


def from_released(
    sd: dict[str, np.ndarray],
    path: str,
    heads: int | None = None,
    drop: Sequence[str] = (),
    checkpoint_config: Any = None,
) -> tuple[dict, dict[str, Any], dict[str, Any]]:
  """A released state dict -> (eve_jax params, config.model dict, report
  pieces {"dropped", "heads", "attention_heads_from"}). `drop`: key
  prefixes to leave out; `heads`, `checkpoint_config` (the checkpoint's
  "config" entry): see `released_heads`."""
  cfg = model_config(sd, path, heads, checkpoint_config)
  heads_from = released_heads(cfg["width"], heads, checkpoint_config, path)[1]
  src = Source(sd, path)
  for pattern, why in _DROP:
    src.drop_matching(pattern, why)
  src.drop_prefixes(drop)
  d, f, h, p = cfg["width"], cfg["mlp_dim"], cfg["heads"], cfg["patch_size"]
  n = (cfg["image_size"] // p) ** 2
  e = cfg["num_experts"]

  def ln(key, dim=d):
    return layout.norm(
        src.take(key + ".weight", (dim,)), src.take(key + ".bias", (dim,))
    )

  def linear(key, out_dim, in_dim, bias=True):
    w = src.take(key + ".weight", (out_dim, in_dim))
    return (w, src.take(key + ".bias", (out_dim,))) if bias else w

  backbone = {
      "image_embed": {
          "patch_kernel": layout.patch_kernel(
              src.take(BACKBONE + "patch_embed.weight", (d, 3, p, p))
          ),
          "patch_bias": src.take(BACKBONE + "patch_embed.bias", (d,)),
          "cls_token": src.take(BACKBONE + "class_embedding_vision", (d,)),
          "pos_embed": src.take(BACKBONE + "pos_embed_vision", (1 + n, d)),
      },
      "text_embed": {
          "word_embed": src.take(
              BACKBONE + "word_embedding.weight", (cfg["vocab_size"], d)
          ),
          "norm": ln(BACKBONE + "layer_norm_text"),
          "pos_embed": src.take(
              BACKBONE + "pos_embed_text", (cfg["max_text_positions"], d)
          ),
      },
      "type_embed": np.stack(
          [
              src.take(BACKBONE + "type_embed_vision", (d,)),
              src.take(BACKBONE + "type_embed_text", (d,)),
          ]
      ),
      "pre_norm": ln(BACKBONE + "pre_layrnorm"),
      "norm": ln(BACKBONE + "norm"),
  }
  blocks = {}
  for i in range(cfg["depth"]):
    b = LAYER.format(i=i)
    qkv = src.take(b + "attn.qkv.weight", (3 * d, d))
    block = {
        "norm1": ln(b + "norm1"),
        "attn": layout.attention(
            qkv[:d],
            qkv[d : 2 * d],
            qkv[2 * d :],
            src.take(b + "attn.q_bias", (d,)),
            src.take(b + "attn.v_bias", (d,)),
            *linear(b + "attn.proj", d, d),
            h,
        ),
        "gamma_1": src.take(b + "gamma_1", (d,)),
        "gamma_2": src.take(b + "gamma_2", (d,)),
    }
    if i >= cfg["depth"] - cfg["num_soft_layers"]:
      m = b + MOE
      block["norm2"] = ln(b + "norm2_vl")
      block["ffn"] = layout.soft_ffn(
          src.take(m + "gate.wg.weight", (e, d)),
          np.stack(
              [
                  src.take(m + "vision_embed", (d,)),
                  src.take(m + "text_embed", (d,)),
              ]
          ),
          [linear(f"{m}experts.experts.{j}.fc1", f, d) for j in range(e)],
          [linear(f"{m}experts.experts.{j}.fc2", d, f) for j in range(e)],
      )
    else:
      norms = [
          (
              src.take(b + f"norm2_{s}.weight", (d,)),
              src.take(b + f"norm2_{s}.bias", (d,)),
          )
          for s in ("imag", "text")
      ]
      block["ffn"] = layout.hard_ffn(
          norms,
          [linear(b + f"mlp_{s}.fc1", f, d) for s in ("imag", "text")],
          [linear(b + f"mlp_{s}.fc2", d, f) for s in ("imag", "text")],
      )
    blocks[i] = block
  backbone["blocks"] = blocks
  params = {"backbone": backbone}
  heads_found = []
  if src.has("output.0.weight") and src.sd["output.0.weight"].shape == (
      2 * d,
      d,
  ):
    answers = src.shape("output.3.bias", "the VQA head's answer biases")[0]
    w1, b1 = linear("output.0", 2 * d, d)
    w2, b2 = linear("output.3", answers, 2 * d)
    params["vqa_head"] = {
        "fc1": {"kernel": layout.linear_in(w1), "bias": b1},
        "norm": ln("output.1", 2 * d),
        "fc2": {"kernel": layout.linear_in(w2), "bias": b2},
    }
    cfg_heads = {"vqa_answers": int(answers)}
    heads_found.append("vqa")
  else:
    cfg_heads = {}
    src.drop_matching(
        r"output\..*",
        "NLVR2 classifier without bi-attention "
        "(two text CLS concatenated): no eve_jax counterpart",
    )
  if src.has("attn1.in_proj_weight"):  # the NLVR2 --biattn head
    params["biattn"] = _biattn_from(src, linear, d, h)
    cfg["nlvr2_head"] = "biattn"
    heads_found.append("nlvr2")
  # Retrieval fine-tuned files name the heads itc_*/itm_head; pretrained
  # ones mitc_*/mitm_head (the released retrieval code renames them so).
  pre = next(
      (q for q in ("", "m") if src.has(q + "itc_vision_proj_head." "weight")),
      None,
  )
  if pre is not None:
    proj = src.shape(pre + "itc_vision_proj_head.weight", "")[0]
    params["matching"] = {
        "image_proj": {
            "kernel": layout.linear_in(
                linear(pre + "itc_vision_proj_head", proj, d, bias=False)
            )
        },
        "text_proj": {
            "kernel": layout.linear_in(
                linear(pre + "itc_text_proj_head", proj, d, bias=False)
            )
        },
        "temp": src.take(pre + "itc_temp", ()),
    }
    itm_w, itm_b = linear(pre + "itm_head", 2, d)
    params["matching"]["itm"] = {
        "kernel": layout.linear_in(itm_w),
        "bias": itm_b,
    }
    heads_found.append("retrieval")
    cfg["retrieval_eval_features"] = "pre_norm"  # released forward_eval
  src.check_all_used()
  dropped = src.dropped_report()
  if "biattn" in params:
    dropped += [
        [
            f"{a}.in_proj_bias[{d}:{2 * d}]",
            [d],
            "k bias: shifts each query's logits equally, cancels in " "softmax",
        ]
        for a in ("attn1", "attn2")
    ]
  return (
      params,
      cfg,
      {
          "dropped": dropped,
          "heads": heads_found,
          "attention_heads_from": heads_from,
          **cfg_heads,
      },
  )


def _biattn_from(src: Source, linear, d: int, heads: int) -> dict:
  """The NLVR2 bi-attention head: two nn.MultiheadAttention (fused
  in_proj [3D, D] and bias [3D]), fc.0, attn_pool.fc.0, nlvr2_output."""
  out = {}
  for name in ("attn1", "attn2"):
    w = src.take(name + ".in_proj_weight", (3 * d, d))
    b = src.take(name + ".in_proj_bias", (3 * d,))
    out[name] = layout.attention(
        w[:d],
        w[d : 2 * d],
        w[2 * d :],
        b[:d],
        b[2 * d :],
        *linear(name + ".out_proj", d, d),
        heads,
    )
  for name, key, shape in (
      ("fc", "fc.0", (d, 2 * d)),
      ("pool", "attn_pool.fc.0", (1, d)),
      ("output", "nlvr2_output", (2, 2 * d)),
  ):
    w, b = linear(key, *shape)
    out[name] = {"kernel": layout.linear_in(w), "bias": b}
  return out
