"""The soft-router layer's settings, carried as one object.

`ModelConfig.moe` (eve_jax/model/variants.py) builds it from the flat
`config.model.*` keys users set; EVE passes it to every soft-router block
and the block to its `ModalityMoE` unchanged, so a new MoE option is one
field here and one key in ModelConfig.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Attributes (the config.model key in brackets where it differs):
  num_experts: E.
  top_k: K choices per token.
  capacity_factor: slots per expert = capacity_factor * K * S / E (0: no
    token dropped).
  min_capacity: at least this many slots [moe_min_capacity].
  aux_loss_weight: alpha of eq. 7.
  router: a name of eve_jax/model/router.py's ROUTERS: "modality" (the
    paper's softmax(W (x + b_m))) or "plain" (softmax(W x)) [moe_router].
  add_modality_to_experts: the experts see x + b_m (the released weights;
    the modality router only).
  normalize_gates: kept top-k gates divided by their sum
    [moe_normalize_gates].
  dispatch: "gather" or "einsum" (eve_jax/model/dispatch.py), or
    "ragged": dropless, no capacity (eve_jax/model/ragged.py)
    [moe_dispatch].
  grouped_matmul: the ragged dispatcher's expert product: "auto",
    "ragged_dot" or "tiles" (ragged.py) [moe_grouped_matmul].
  ragged_buffer_factor: with "ragged" and the experts sharded over
    `expert`, each device's receive buffer holds this many times its own
    T * K assignments (a balanced load), the rest cut and counted in
    `dropped` (ragged_shards.py); 0: the worst case, X times, nothing
    dropped [moe_ragged_buffer_factor].
  experts: "auto", "batched" or "unrolled" [moe_experts].
  group: "sample" (one routing group per sequence) or "batch" (all B * L
    tokens of a call) [moe_group].
  route_padding: padding tokens take slots like any other
    [moe_route_padding].
  activation: the experts' activation.
  """

  num_experts: int = 4
  top_k: int = 2
  capacity_factor: float = 1.25
  min_capacity: int = 1
  aux_loss_weight: float = 0.001
  router: str = "modality"
  add_modality_to_experts: bool = True
  normalize_gates: bool = False
  dispatch: str = "gather"
  grouped_matmul: str = "auto"
  ragged_buffer_factor: float = 0.0
  experts: str = "auto"
  group: str = "sample"
  route_padding: bool = False
  activation: str = "gelu"
