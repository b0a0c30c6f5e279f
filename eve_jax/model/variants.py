"""Model sizes (`model.variant`) and the typed config the model is built from.

The ConfigDict from `configs/` stops here: `ModelConfig.from_config` turns it
into a frozen dataclass, and layers take plain typed arguments.

Variant table (paper, Implementation Details and Appendix):

| variant | layers | width | heads | MLP  | soft-MoE layers | experts | decoder   | image/patch |
|---------|--------|-------|-------|------|-----------------|---------|-----------|-------------|
| tiny    | 4      | 128   | 4     | 512  | top 2           | 4       | 128x2x4   | 64 / 16     |
| small   | 6      | 384   | 6     | 1536 | top 2           | 8       | 256x4x8   | 224 / 16    |
| base    | 12     | 768   | 12    | 3072 | top 2 (10, 11)  | 32      | 512x8x16  | 224 / 16    |
| large   | 24     | 1024  | 16    | 4096 | top 3 (21..23)  | 32      | 512x8x16  | 224 / 16    |
"""

from __future__ import annotations

import dataclasses
from typing import Any

from eve_jax.model.moe_config import MoEConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        depth=4,
        width=128,
        heads=4,
        mlp_dim=512,
        num_soft_layers=2,
        num_experts=4,
        decoder_width=128,
        decoder_depth=2,
        decoder_heads=4,
        image_size=64,
        patch_size=16,
    ),
    "small": dict(
        depth=6,
        width=384,
        heads=6,
        mlp_dim=1536,
        num_soft_layers=2,
        num_experts=8,
        decoder_width=256,
        decoder_depth=4,
        decoder_heads=8,
        image_size=224,
        patch_size=16,
    ),
    "base": dict(
        depth=12,
        width=768,
        heads=12,
        mlp_dim=3072,
        num_soft_layers=2,
        num_experts=32,
        decoder_width=512,
        decoder_depth=8,
        decoder_heads=16,
        image_size=224,
        patch_size=16,
    ),
    "large": dict(
        depth=24,
        width=1024,
        heads=16,
        mlp_dim=4096,
        num_soft_layers=3,
        num_experts=32,
        decoder_width=512,
        decoder_depth=8,
        decoder_heads=16,
        image_size=224,
        patch_size=16,
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the EVE backbone and its pretraining heads need."""

  variant: str = "tiny"
  depth: int = 4
  width: int = 128
  heads: int = 4
  mlp_dim: int = 512
  num_soft_layers: int = 2  # soft-router MoE in the top N blocks
  # Each block's FFN, bottom to top, comma-separated: "shared" (one FFN for
  # both modalities), "hard" (one FFN per modality: the hard router) or
  # "soft" (the soft-router MoE); "kind*n" repeats, e.g. "hard*10,soft*2".
  # "" is EVE's: hard, with soft in the top `num_soft_layers` blocks.
  # (The paper's Tables 7, 12 and 13; `ffn_kinds` reads it.)
  ffn_plan: str = ""
  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float = 1.25
  aux_loss_weight: float = 0.001  # alpha of eq. 7
  add_modality_to_experts: bool = True  # the released weights do this
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  image_size: int = 64
  patch_size: int = 16
  vocab_size: int = 64
  max_text_len: int = 40
  max_text_positions: int = 196
  layer_scale_init: float = 0.1
  drop_path: float = 0.1
  activation: str = "gelu"  # "quick_gelu" to load the released weights
  # Embedding-level switches, on for EVE; off to match a plain BEiT stack
  # (eve_jax.convert's parity tests): the LayerNorm before the blocks,
  # learned absolute positions (image and text), the modality type table.
  pre_norm: bool = True
  position_embed: bool = True
  type_embed: bool = True
  # Divide each token's kept top-k gates by their sum (DeepSpeed top2gating,
  # what the released soft-router layers compute) instead of using the raw
  # softmax values (paper eq. 5).
  moe_normalize_gates: bool = False
  # Routing groups and padding (ModalityMoE): "sample" groups one sequence
  # and never routes padding (eve_jax); "batch" + route_padding + minimum
  # capacity 4 is the released EVE's DeepSpeed layer, where all B * L
  # tokens of a pass are one group, padding included. `convert eve` sets
  # them; results then depend on the evaluation batch size, as released.
  moe_group: str = "sample"
  moe_route_padding: bool = False
  moe_min_capacity: int = 1
  # The soft-router layers' router (eve_jax/model/router.py: ROUTERS):
  # "modality" (eq. 4, the paper's) or "plain" (no modality embedding).
  moe_router: str = "modality"
  # Released-computation switches of the task heads: the VQA head's
  # LayerNorm eps (1e-5 released, torch's default) and the retrieval
  # evaluation features, the CLS "normed" by the final LayerNorm (as in
  # training) or taken "pre_norm" (the released forward_eval).
  vqa_head_eps: float = 1e-6
  retrieval_eval_features: str = "normed"
  # NLVR2 head: "eve_jax" (LayerNorm + attention per side, classifier on
  # the two text CLS) or "biattn" (the released head: cross-attention,
  # per-token MLP, attention pooling; what converted NLVR2 weights load).
  nlvr2_head: str = "eve_jax"
  dtype: str = "float32"  # compute dtype; params stay float32
  # Speed knobs (outputs unchanged up to float rounding):
  moe_dispatch: str = "gather"  # or "einsum" (one-hot, vmoe's form)
  # moe_dispatch="ragged" is not a speed knob: dropless, it keeps the
  # assignments a capacity drops (eve_jax/model/ragged.py). Its expert
  # product: "auto" (XLA's ragged dot on TPU, row tiles elsewhere),
  # "ragged_dot" or "tiles".
  moe_grouped_matmul: str = "auto"
  # With "ragged" and the experts sharded over `expert`: a device's receive
  # buffer is this many times its own assignments (MaxText's
  # ragged_buffer_factor); what a device is sent past it is dropped and
  # counted (dropped_token_frac). 0: the worst case (X times), dropless.
  moe_ragged_buffer_factor: float = 0.0
  # Experts as one batched einsum or E separate matmuls; "auto": separate
  # on CPU when the experts are not sharded (faster there), else batched.
  moe_experts: str = "auto"
  attention: str = "einsum"  # or "xla" / "cudnn": jax.nn.dot_product_attention
  remat: bool = False  # recompute each block's activations in the backward
  # Hard-router blocks as one stacked block run by nnx.scan (parameters get
  # a leading `layers` axis): one compiled block instead of depth copies.
  # Changes the parameter layout; `eve.scan_layout`/`unscan_layout` convert.
  scan_layers: bool = False
  # "dense" swaps every soft-router MoE for a dense FFN of top_k * mlp_dim
  # hidden units (the same active FLOPs): the benchmark's comparison model.
  soft_ffn: str = "moe"
  # ITC projections + temperature and the ITM head (objectives itc, itm).
  matching_heads: bool = False

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def moe(self) -> MoEConfig:
    """The soft-router layers' settings as one object."""
    return MoEConfig(
        num_experts=self.num_experts,
        top_k=self.top_k,
        capacity_factor=self.capacity_factor,
        min_capacity=self.moe_min_capacity,
        aux_loss_weight=self.aux_loss_weight,
        router=self.moe_router,
        add_modality_to_experts=self.add_modality_to_experts,
        normalize_gates=self.moe_normalize_gates,
        dispatch=self.moe_dispatch,
        grouped_matmul=self.moe_grouped_matmul,
        ragged_buffer_factor=self.moe_ragged_buffer_factor,
        experts=self.moe_experts,
        group=self.moe_group,
        route_padding=self.moe_route_padding,
        activation=self.activation,
    )

  @property
  def ffn_kinds(self) -> tuple[str, ...]:
    """[depth] each block's FFN: "shared", "hard" or "soft" (`ffn_plan`)."""
    if not self.ffn_plan:
      n_hard = self.depth - self.num_soft_layers
      return ("hard",) * n_hard + ("soft",) * self.num_soft_layers
    return parse_ffn_plan(self.ffn_plan)

  @property
  def soft_layers(self) -> tuple[int, ...]:
    """0-based indices of the soft-router blocks, ascending."""
    return tuple(i for i, k in enumerate(self.ffn_kinds) if k == "soft")

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """The soft blocks that run the MoE (none when `soft_ffn` is "dense"):
    the layers whose routing numbers an evaluation reports."""
    return self.soft_layers if self.soft_ffn == "moe" else ()

  def soft_layer(self, i: int) -> bool:
    """Whether block i (0-based) has the soft-router MoE."""
    return self.ffn_kinds[i] == "soft"

  @classmethod
  def from_config(
      cls, model_cfg: Any, vocab_size: int | None = None
  ) -> "ModelConfig":
    """Variant defaults, then every key of `model_cfg` that is set.

    Args:
      model_cfg: `config.model` (ConfigDict or dict) with at least `variant`.
      vocab_size: the tokenizer's size, when known only at run time.
    """
    d = dict(model_cfg)
    variant = d.get("variant", "tiny")
    if variant not in VARIANTS:
      raise ValueError(
          f"config.model.variant={variant!r} is not one of "
          f"{sorted(VARIANTS)}"
      )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(
          f"config.model has unknown keys {unknown}; known: "
          f"{sorted(fields)}"
      )
    kw = dict(VARIANTS[variant])
    kw.update({k: v for k, v in d.items() if v is not None})
    if kw.get("ffn_plan"):
      # A plan says where the soft blocks are; num_soft_layers follows it
      # unless it was set to something else on purpose.
      n_soft = parse_ffn_plan(kw["ffn_plan"]).count("soft")
      given = kw.get("num_soft_layers", n_soft)
      if given not in (n_soft, VARIANTS[variant]["num_soft_layers"]):
        raise ValueError(
            f"model.ffn_plan={kw['ffn_plan']!r} has {n_soft} soft blocks "
            f"but model.num_soft_layers={given}; set only ffn_plan"
        )
      kw["num_soft_layers"] = n_soft
    if vocab_size is not None:
      kw["vocab_size"] = vocab_size
    cfg = cls(**kw)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    if self.width % self.heads:
      raise ValueError(
          f"model.width={self.width} is not divisible by "
          f"model.heads={self.heads}"
      )
    if self.decoder_width % self.decoder_heads:
      raise ValueError(
          f"model.decoder_width={self.decoder_width} is not "
          f"divisible by model.decoder_heads={self.decoder_heads}"
      )
    if self.image_size % self.patch_size:
      raise ValueError(
          f"model.image_size={self.image_size} is not a multiple "
          f"of model.patch_size={self.patch_size}"
      )
    if self.ffn_plan:
      kinds = parse_ffn_plan(self.ffn_plan)
      if len(kinds) != self.depth:
        raise ValueError(
            f"model.ffn_plan={self.ffn_plan!r} names {len(kinds)} blocks; "
            f"model.depth={self.depth}"
        )
      if kinds.count("soft") != self.num_soft_layers:
        raise ValueError(
            f"model.ffn_plan={self.ffn_plan!r} has {kinds.count('soft')} "
            f"soft blocks but model.num_soft_layers={self.num_soft_layers}"
        )
    if not 0 <= self.num_soft_layers <= self.depth:
      raise ValueError(
          f"model.num_soft_layers={self.num_soft_layers} not in "
          f"[0, depth={self.depth}]"
      )
    if self.top_k > self.num_experts:
      raise ValueError(
          f"model.top_k={self.top_k} > model.num_experts=" f"{self.num_experts}"
      )
    if self.max_text_len > self.max_text_positions:
      raise ValueError(
          f"max_text_len={self.max_text_len} exceeds "
          f"max_text_positions={self.max_text_positions}"
      )
    if self.activation not in ("gelu", "quick_gelu"):
      raise ValueError(
          f"model.activation={self.activation!r} is not 'gelu' "
          "or 'quick_gelu'"
      )
    for name, allowed in (
        ("moe_dispatch", ("gather", "einsum", "ragged")),
        ("moe_grouped_matmul", ("auto", "ragged_dot", "tiles")),
        ("moe_experts", ("auto", "batched", "unrolled")),
        ("attention", ("einsum", "xla", "cudnn")),
        ("soft_ffn", ("moe", "dense")),
        ("nlvr2_head", ("eve_jax", "biattn")),
        ("moe_group", ("sample", "batch")),
        ("retrieval_eval_features", ("normed", "pre_norm")),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(
            f"model.{name}={getattr(self, name)!r} is not one "
            f"of {list(allowed)}"
        )
    from eve_jax.model.router import ROUTERS  # pylint: disable=g-import-not-at-top

    if self.moe_router not in ROUTERS:
      raise ValueError(
          f"model.moe_router={self.moe_router!r} is not one of "
          f"{sorted(ROUTERS)}"
      )
    if self.moe_ragged_buffer_factor < 0:
      raise ValueError(
          f"model.moe_ragged_buffer_factor={self.moe_ragged_buffer_factor}: "
          "expected >= 0 (0: the worst case, nothing dropped)"
      )
    if self.moe_min_capacity < 1:
      raise ValueError(
          f"model.moe_min_capacity={self.moe_min_capacity}: " "expected >= 1"
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"model.dtype={self.dtype!r} is not 'float32' or " "'bfloat16'"
      )


FFN_KINDS = ("shared", "hard", "soft")


def parse_ffn_plan(plan: str) -> tuple[str, ...]:
  """ "hard*2,soft,shared" -> ("hard", "hard", "soft", "shared").

  Raises ValueError (one line) for an unknown kind or a bad repeat count.
  """
  kinds = []
  for part in plan.replace(" ", "").split(","):
    kind, star, count = part.partition("*")
    if kind not in FFN_KINDS:
      raise ValueError(
          f"model.ffn_plan={plan!r}: {kind!r} is not one of {list(FFN_KINDS)}"
      )
    if star and not (count.isdigit() and int(count) > 0):
      raise ValueError(
          f"model.ffn_plan={plan!r}: {part!r} needs a positive count"
      )
    kinds += [kind] * (int(count) if star else 1)
  return tuple(kinds)
