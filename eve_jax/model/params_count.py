"""Parameter counts: in total, and the ones one token actually uses.

A token passes through one of the M hard-router FFNs and K of the E soft-
router experts, so "per token" = backbone total - (M - 1) hard FFNs per hard
layer - (E - K) experts per soft layer (the paper's "parameters per token").
"""

from __future__ import annotations

import math
from typing import Any

import jax

from eve_jax.model.variants import ModelConfig

NUM_MODALITIES = 2


def _size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_params(params: Any, cfg: ModelConfig) -> dict[str, int]:
  """Counts for an EVEPretrainModel's Param state (arrays or shapes).

  Returns:
    total: every parameter (backbone + MLM head + MIM decoder).
    backbone: the EVE encoder (what downstream tasks keep).
    backbone_per_token: the backbone parameters one token is computed with.
  """
  total = _size(params)
  backbone = _size(params["backbone"])
  d, f = cfg.width, cfg.mlp_dim
  ffn = d * f + f + f * d + d  # wi, bi, wo, bo
  kinds = cfg.ffn_kinds
  inactive = (
      kinds.count("hard") * (NUM_MODALITIES - 1) * (ffn + 2 * d)  # + its LN
      + kinds.count("soft") * (cfg.num_experts - cfg.top_k) * ffn
  )
  return dict(
      total=total, backbone=backbone, backbone_per_token=backbone - inactive
  )
