"""Analytic FLOPs of a training step, per sample: what MFU is measured with.

Counts the matrix multiplications the algorithm needs (2 FLOPs per
multiply-add) and nothing else: no elementwise ops, softmax, LayerNorm, or
the capacity padding of the MoE (experts are counted at their active tokens,
K per token). Every token of the static shapes is counted (text padding
included), since the step computes them.

A training step costs 3x the forward pass (the backward computes gradients
for inputs and weights), except the patch embedding, whose input is the
image: 2x.

Legend: D width, F FFN hidden, E experts, K top-k, N patches, Nv visible
patches, Lt text length, V vocabulary, Dd decoder width, Q = P*P*3.
"""

from __future__ import annotations

from eve_jax.model.variants import ModelConfig

OBJECTIVES = ("mlm", "mim", "joint", "itc", "itm")


def mm(m: int, k: int, n: int) -> float:
  """FLOPs of an [m, k] x [k, n] product."""
  return 2.0 * m * k * n


def attention(length: int, dim: int) -> float:
  """q, k, v, out projections + q k^T + probs v for one sequence."""
  return 4 * mm(length, dim, dim) + 2 * mm(length, dim, length)


def moe_layer(cfg: ModelConfig, length: int) -> float:
  """A soft-router layer at its active experts: K FFNs per token + router."""
  ffn = mm(length, cfg.width, cfg.mlp_dim) + mm(length, cfg.mlp_dim, cfg.width)
  return cfg.top_k * ffn + mm(length, cfg.width, cfg.num_experts)


def encoder(cfg: ModelConfig, image_len: int, text_len: int) -> float:
  """Forward FLOPs of the shared stack over [image_len ; text_len] tokens."""
  length = image_len + text_len
  d, f = cfg.width, cfg.mlp_dim
  total = 0.0
  for i in range(cfg.depth):
    total += attention(length, d)
    if cfg.soft_layer(i) and cfg.soft_ffn == "moe":
      total += moe_layer(cfg, length)
    else:  # shared / hard FFN (one per token) or the dense comparison model
      hidden = f * cfg.top_k if cfg.soft_layer(i) else f
      total += mm(length, d, hidden) + mm(length, hidden, d)
  return total


def patch_embed(cfg: ModelConfig) -> float:
  return mm(cfg.num_patches, cfg.patch_size**2 * 3, cfg.width)


def mim_decoder(cfg: ModelConfig, visible: int) -> float:
  dd, q = cfg.decoder_width, cfg.patch_size**2 * 3
  tokens = 1 + cfg.num_patches
  blocks = cfg.decoder_depth * (
      attention(tokens, dd) + mm(tokens, dd, 4 * dd) + mm(tokens, 4 * dd, dd)
  )
  return mm(1 + visible, cfg.width, dd) + blocks + mm(tokens, dd, q)


def train_flops_per_sample(
    cfg: ModelConfig,
    objectives=("mlm", "mim"),
    image_mask_ratio: float = 0.75,
    batch_size: int = 1,
    proj_dim: int | None = None,
) -> dict[str, float]:
  """{objective: training FLOPs per sample, ..., "total": their sum}.

  Args:
    cfg: the model.
    objectives: any of mlm (full image + masked text, MLM head on every text
      position), mim (visible patches + text, pixel decoder), joint (both
      in one pass over visible patches + masked text), itc (image-only
      and text-only passes, projections, B x B similarities), itm (three
      fused passes: the pair, a hard-negative image, a hard-negative text).
    image_mask_ratio: MIM's masked fraction of patches.
    batch_size: B, for the ITC similarity matrix (B^2 / B per sample).
    proj_dim: ITC projection width (default D).
  """
  unknown = set(objectives) - set(OBJECTIVES)
  if unknown:
    raise ValueError(f"objectives {sorted(unknown)} are not in {OBJECTIVES}")
  d, lt = cfg.width, cfg.max_text_len
  li = 1 + cfg.num_patches
  proj = proj_dim or d
  embed = 2 * patch_embed(cfg)  # forward + weight gradient only
  out = {}
  if "mlm" in objectives:
    head = mm(lt, d, d) + mm(lt, d, cfg.vocab_size)
    out["mlm"] = 3 * (encoder(cfg, li, lt) + head) + embed
  if "mim" in objectives:
    visible = cfg.num_patches - int(image_mask_ratio * cfg.num_patches + 0.5)
    out["mim"] = (
        3 * (encoder(cfg, 1 + visible, lt) + mim_decoder(cfg, visible)) + embed
    )
  if "joint" in objectives:  # one pass: visible patches + masked text
    visible = cfg.num_patches - int(image_mask_ratio * cfg.num_patches + 0.5)
    head = mm(lt, d, d) + mm(lt, d, cfg.vocab_size)
    out["joint"] = (
        3 * (encoder(cfg, 1 + visible, lt) + head + mim_decoder(cfg, visible))
        + embed
    )
  if "itc" in objectives:
    unimodal = encoder(cfg, li, 0) + encoder(cfg, 0, lt)
    out["itc"] = (
        3 * (unimodal + 2 * mm(1, d, proj) + 2 * mm(1, proj, batch_size))
        + embed
    )
  if "itm" in objectives:
    out["itm"] = 3 * 3 * (encoder(cfg, li, lt) + mm(1, d, 2)) + 3 * embed
  out["total"] = sum(out.values())
  return out


def finetune_flops_per_sample(
    cfg: ModelConfig, task: str, batch_size: int = 1
) -> float:
  """Training FLOPs per example of a fine-tuning task's backbone passes
  (3 x forward; the small heads left out).

  vqa: one fused pass; nlvr2: two fused passes (one per image); retrieval:
  ITC's two unimodal passes plus ITM's three fused ones.
  """
  li, lt = 1 + cfg.num_patches, cfg.max_text_len
  fused = 3 * encoder(cfg, li, lt) + 2 * patch_embed(cfg)
  if task == "vqa":
    return fused
  if task == "nlvr2":
    return 2 * fused
  if task == "retrieval":
    return train_flops_per_sample(cfg, ("itc", "itm"), batch_size=batch_size)[
        "total"
    ]
  raise ValueError(f"no FLOP count for task {task!r}")
