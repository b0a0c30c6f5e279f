"""Which experts the soft-router layers send image and text tokens to
(paper Figure 6), as eval.json numbers and bar charts.

eval.json keys, one per soft-router layer i (the block's 0-based index in
the backbone), modality and expert e:

  routing/layer{i}/image/expert{e}: the fraction of the evaluation's image
    tokens that chose expert e among their top-k;
  routing/layer{i}/text/expert{e}: the same for text tokens.

Each token picks top_k experts, so a layer's image fractions sum to top_k
(2): uniform routing over E experts gives top_k / E each. Choices count
whether or not the expert had room (capacity drops are reported apart, as
`dropped_token_frac`). The numbers come from the evaluation's MLM pass
(the full image and the text with its masked words).

Routing health (`health`), per soft-router layer i, both modalities
together:

  routing/layer{i}/load/expert{e}: expert e's share of the layer's top-k
    choices over the ideal share 1/E (1 = its fair share; E / top_k when
    every token chose it);
  routing/layer{i}/load_max: the largest of those;
  routing/layer{i}/dead_frac: the share of experts no token chose;
  routing/layer{i}/load_entropy: entropy of the choices over experts over
    log E (1 balanced, 0 all to one expert);
  routing/layer{i}/router_entropy: mean entropy (nats) of a token's router
    distribution (log E: undecided; 0: certain), and per modality as
    routing/layer{i}/{image,text}/router_entropy.

Legend: S soft-router layers, M modalities (0 image, 1 text), E experts.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from eve_jax.viz import charts

MODALITIES = ("image", "text")
_KEY = re.compile(r"^routing/layer(\d+)/(image|text)/expert(\d+)$")


def soft_layers(depth: int, num_soft_layers: int) -> list[int]:
  """Backbone indices of the soft-router blocks (the top ones)."""
  return list(range(depth - num_soft_layers, depth))


def fractions(expert_counts: np.ndarray, top_k: int) -> np.ndarray:
  """[S, M, E] top-k choices per expert -> [S, M, E] fraction of each
  modality's tokens that chose the expert (a token's k choices are
  distinct experts, so tokens = choices / k); 0 for a modality with no
  tokens."""
  counts = np.asarray(expert_counts, np.float64)
  tokens = counts.sum(-1, keepdims=True) / top_k
  return np.divide(counts, tokens, out=np.zeros_like(counts), where=tokens > 0)


def metrics(
    expert_counts: np.ndarray, top_k: int, layers: list[int]
) -> dict[str, float]:
  """The eval.json keys above from summed [S, M, E] counts."""
  fr = fractions(expert_counts, top_k)
  if fr.shape[0] != len(layers):
    raise ValueError(
        f"{fr.shape[0]} routing count rows for soft layers " f"{layers}"
    )
  return {
      f"routing/layer{layer}/{MODALITIES[m]}/expert{e}": float(fr[s, m, e])
      for s, layer in enumerate(layers)
      for m in range(fr.shape[1])
      for e in range(fr.shape[2])
  }


def health(
    expert_counts: np.ndarray,
    router_entropy: np.ndarray,
    top_k: int,
    layers: list[int],
) -> dict[str, float]:
  """The routing-health keys above.

  Args:
    expert_counts: [S, M, E] top-k choices per modality and expert, summed
      over an evaluation.
    router_entropy: [S, M] summed per-token router entropies (nats).
    top_k: choices per token.
    layers: the S soft-router blocks' indices.
  """
  counts = np.asarray(expert_counts, np.float64)
  entropy = np.asarray(router_entropy, np.float64)
  if counts.shape[0] != len(layers) or entropy.shape[0] != len(layers):
    raise ValueError(
        f"{counts.shape[0]} routing count rows for soft layers {layers}"
    )
  out = {}
  for s, layer in enumerate(layers):
    key = f"routing/layer{layer}"
    per_expert = counts[s].sum(0)  # [E] choices
    n_exp, total = per_expert.shape[0], per_expert.sum()
    share = per_expert / total if total > 0 else np.zeros(n_exp)
    load = share * n_exp
    for e in range(n_exp):
      out[f"{key}/load/expert{e}"] = float(load[e])
    out[f"{key}/load_max"] = float(load.max()) if n_exp else 0.0
    out[f"{key}/dead_frac"] = float(np.mean(per_expert == 0)) if n_exp else 0.0
    nz = share[share > 0]
    out[f"{key}/load_entropy"] = (
        float(-(nz * np.log(nz)).sum() / np.log(n_exp)) if n_exp > 1 else 0.0
    )
    tokens = counts[s].sum(-1) / top_k  # [M]
    out[f"{key}/router_entropy"] = float(
        entropy[s].sum() / max(tokens.sum(), 1.0)
    )
    for m, name in enumerate(MODALITIES):
      out[f"{key}/{name}/router_entropy"] = float(
          entropy[s, m] / max(tokens[m], 1.0)
      )
  return out


def from_metrics(values: Mapping[str, float]) -> dict[int, np.ndarray]:
  """eval.json -> {layer: [M, E] fractions} (the inverse of `metrics`)."""
  found: dict[int, dict[tuple[int, int], float]] = {}
  for k, v in values.items():
    m = _KEY.match(k)
    if m:
      found.setdefault(int(m.group(1)), {})[
          (MODALITIES.index(m.group(2)), int(m.group(3)))
      ] = float(v)
  out = {}
  for layer, cells in sorted(found.items()):
    n_exp = 1 + max(e for _, e in cells)
    arr = np.zeros((len(MODALITIES), n_exp))
    for (mod, e), v in cells.items():
      arr[mod, e] = v
    out[layer] = arr
  return out


def chart(fracs: np.ndarray, layer: int, step: int | None = None) -> np.ndarray:
  """Figure 6 for one layer: per expert, the fraction of image and of
  text tokens routed to it. fracs [M, E] -> uint8 picture."""
  n_exp = fracs.shape[1]
  title = f"soft-router layer {layer}: tokens routed to each expert"
  if step is not None:
    title += f" (step {step})"
  return charts.bar_chart(
      [str(e) for e in range(n_exp)],
      {f"{name} tokens": fracs[m] for m, name in enumerate(MODALITIES)},
      title=title,
      x_label="expert",
      y_max=1.0,
      width=max(360, 48 + 30 * n_exp),
  )
