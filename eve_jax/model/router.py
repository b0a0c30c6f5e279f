"""The soft-router layer's router: which experts each token asks for, with
what gate, and what capacity lets through (EVE eqs. 4-7).

A router (`ROUTERS`, chosen by `MoEConfig.router` = config.model.moe_router)
owns the router parameters and computes logits; `decide` runs the rest,
the same for every router: `route` turns the logits into a `Dispatch`
(choices, gates, kept mask), `expert_capacity` sizes the expert buffers,
`normalize_gates` is the released model's renormalization,
`load_balancing_loss` is eq. 7, and `MoEStats` what a layer reports.
`ModalityMoE` (moe.py) then runs a dispatcher (dispatch.py) and the experts.

Routers:
  "modality"  softmax(W (x + b_m)), b_m a learned embedding per modality
              (eq. 4; the paper's and the released weights')
  "plain"     softmax(W x): no modality embedding, routing blind to the
              modality ids
A new router is one class here (`params`, `logits`) and one entry in
ROUTERS; its parameters live in the layer under the names it gives.

Dimension legend (as in moe.py):
  G groups, S group size, D model width, E experts, K top-k, C capacity,
  M modalities.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.layers import param
from eve_jax.model.moe_config import MoEConfig

_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def expert_capacity(
    group_size: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 1,
) -> int:
  """Slots per expert per group: ceil(K * S * capacity_factor / E), at
  least `min_capacity` (DeepSpeed's, 4 in the released EVE) and 1.

  `capacity_factor <= 0` means no dropping: C = S. The result is also capped at
  S, since the K choices of a token are distinct experts, so no expert can
  receive more than S assignments from one group; a larger C is pure waste
  (and drops nothing a larger minimum would keep).
  """
  if capacity_factor <= 0:
    return group_size
  c = math.ceil(top_k * group_size * capacity_factor / num_experts)
  return max(1, min(max(c, min_capacity), group_size))


@flax.struct.dataclass
class Dispatch:
  """Routing decision for G groups of S tokens.

  Attributes:
    dispatch: [G, S, E, C] bool, token s goes to slot c of expert e.
    combine: [G, S, E, C] float32, the raw gate g(x)_e at the kept slots
      (eq. 5, not renormalized over the top-k), 0 elsewhere.
    probs: [G, S, E] float32 router probabilities.
    expert_choice: [G, S, K] int32 top-K experts per token, best first.
    kept: [G, S, K] bool, the choice is valid and fitted in its expert.
    position: [G, S, K] int32 slot of each choice in its expert (meaningful
      where `kept`).
    gates: [G, S, K] float32 gate of each choice, 0 where not kept.

  `dispatch`/`combine` are the dense one-hot form (the einsum dispatch);
  `expert_choice`/`position`/`gates` the index form (the gather dispatch).
  Inside jit, whichever form a layer does not use costs nothing (XLA drops
  it).
  """

  dispatch: jax.Array
  combine: jax.Array
  probs: jax.Array
  expert_choice: jax.Array
  kept: jax.Array
  position: jax.Array
  gates: jax.Array


def route(
    logits: jax.Array, valid: jax.Array, top_k: int, capacity: int
) -> Dispatch:
  """Top-K routing with per-group expert capacity (GShard / vmoe priority).

  Assignments take slots in priority order: every token's top-1 choice in
  token order, then every token's top-2 choice, and so on; an assignment
  whose position in its expert is >= `capacity` is dropped. Padding tokens
  (`valid == False`) are never routed and take no slot.

  Args:
    logits: [G, S, E] router logits (softmax is taken in float32).
    valid: [G, S] bool, False for padding tokens.
    top_k: K, experts per token.
    capacity: C, slots per expert per group (see `expert_capacity`);
      None: dropless (every valid choice kept; `dispatch`, `combine` and
      `position` are None, the ragged dispatcher needs none of them).

  Returns:
    A `Dispatch`.
  """
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  _, choice = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)  # [G, S, K]
  choice_1h = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)
  # The chosen probabilities picked by a one-hot mask, not top_k's values:
  # the same numbers, but the gradient is a dense multiply instead of a
  # scatter-add into [G, S, E] (which XLA:TPU offloads to the SparseCore,
  # 8 per EVE-Base step). Multiply and sum, not a dot: a float32 dot runs
  # at reduced precision on TPU by default.
  gates = jnp.sum(choice_1h * probs[:, :, None, :], axis=-1)
  valid = valid.astype(bool)
  if capacity is None:
    kept = jnp.broadcast_to(valid[:, :, None], choice.shape)
    return Dispatch(
        dispatch=None,
        combine=None,
        probs=probs,
        expert_choice=choice.astype(jnp.int32),
        kept=kept,
        position=None,
        gates=jnp.where(kept, gates, 0.0),
    )
  # [G, S, K, E]: which expert each valid (token, choice) asks for.
  wants = choice_1h.astype(jnp.int32)
  wants = wants * valid[:, :, None, None].astype(jnp.int32)
  # Priority order = choice-major, token-minor: cumsum over (K, S) flattened.
  g, s = valid.shape
  by_priority = jnp.swapaxes(wants, 1, 2).reshape(g, top_k * s, num_experts)
  position = jnp.cumsum(by_priority, axis=1) - 1
  position = jnp.swapaxes(position.reshape(g, top_k, s, num_experts), 1, 2)
  position = jnp.sum(position * wants, axis=-1)  # [G, S, K]
  kept = valid[:, :, None] & (position < capacity)
  # one_hot of an out-of-range position is all zeros, but mask anyway.
  slot = jax.nn.one_hot(position, capacity, dtype=jnp.float32)
  slot = slot * kept[..., None].astype(jnp.float32)  # [G, S, K, C]
  wants_f = wants.astype(jnp.float32)
  dispatch = jnp.einsum("GSKE,GSKC->GSEC", wants_f, slot)
  combine = jnp.einsum("GSKE,GSKC->GSEC", wants_f, slot * gates[..., None])
  return Dispatch(
      dispatch=dispatch > 0,
      combine=combine,
      probs=probs,
      expert_choice=choice.astype(jnp.int32),
      kept=kept,
      position=position.astype(jnp.int32),
      gates=jnp.where(kept, gates, 0.0),
  )


def normalize_gates(d: Dispatch) -> Dispatch:
  """Each token's kept gates divided by their sum (DeepSpeed's top2gating,
  what the released EVE soft-router layers compute): a token whose choices
  were all dropped keeps zeros; one with a choice dropped gives the other
  all the weight."""
  total = jnp.sum(d.gates, axis=-1)  # [G, S]
  # DeepSpeed clamps the denominator at float32 eps the same way.
  inv = 1.0 / jnp.maximum(total, jnp.finfo(jnp.float32).eps)
  combine = None if d.combine is None else d.combine * inv[..., None, None]
  return d.replace(gates=d.gates * inv[..., None], combine=combine)


def load_balancing_loss(
    probs: jax.Array, expert_choice: jax.Array, valid: jax.Array, alpha: float
) -> jax.Array:
  """Eq. 7: alpha * E * sum_i f_i p_i over the valid tokens of all groups.

  p_i is the mean router probability of expert i, f_i the fraction of the
  top-K choices (before capacity dropping) that go to expert i, so that
  sum_i f_i = 1 and uniform routing gives exactly alpha.

  Args:
    probs: [G, S, E] router probabilities.
    expert_choice: [G, S, K] int top-K experts.
    valid: [G, S] bool, False for padding tokens.
    alpha: loss weight.

  Returns:
    A float32 scalar.
  """
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  n_tokens = jnp.maximum(jnp.sum(w), 1.0)
  p = jnp.einsum("GSE,GS->E", probs.astype(jnp.float32), w) / n_tokens
  chosen = jax.nn.one_hot(expert_choice, num_experts, dtype=jnp.float32)
  counts = jnp.einsum("GSKE,GS->E", chosen, w)
  f = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return alpha * num_experts * jnp.sum(f * p)


@flax.struct.dataclass
class MoEStats:
  """What a `ModalityMoE` call reports besides its output.

  Attributes:
    aux_loss: float32 scalar, eq. 7 already multiplied by `aux_loss_weight`.
    dropped: float32 scalar, valid (token, choice) assignments dropped by
      capacity.
    routed: float32 scalar, valid (token, choice) assignments (K * tokens).
    expert_counts: [M, E] float32, top-K choices (kept and dropped) of each
      modality's valid tokens per expert.
    router_entropy: [M] float32, the entropy (nats) of each valid token's
      router distribution, summed per modality (a confident router: 0;
      uniform over E experts: log E per token).
  """

  aux_loss: jax.Array
  dropped: jax.Array
  routed: jax.Array
  expert_counts: jax.Array
  router_entropy: jax.Array


class Router(Protocol):
  """How a soft-router layer scores the experts for each token."""

  def params(
      self,
      rngs: nnx.Rngs,
      dim: int,
      num_experts: int,
      num_modalities: int,
      param_dtype,
  ) -> dict[str, nnx.Param]:
    """The router's parameters, by the attribute names the layer stores
    them under (in creation order: it draws from `rngs`)."""

  def logits(
      self,
      params: Mapping[str, jax.Array],
      x: jax.Array,
      modality: jax.Array,
      num_modalities: int,
  ) -> tuple[jax.Array, jax.Array]:
    """([G, S, E] float32 logits, [G, S, D] float32 expert input) for
    tokens x [G, S, D] with modality ids [G, S]. The expert input is what
    the experts see (x, or x + b_m for the modality router with
    `add_modality_to_experts`)."""


@dataclasses.dataclass(frozen=True)
class ModalityRouter:
  """Eq. 4: g(x) = softmax(W (x + b_m)) with b_m learned per modality."""

  add_modality_to_experts: bool = True

  def params(self, rngs, dim, num_experts, num_modalities, param_dtype):
    return {
        "kernel": param(
            rngs, _KERNEL_INIT, (dim, num_experts), ("embed", None), param_dtype
        ),
        # Small normal rather than zeros: the router sees the modality
        # from step 0.
        "modality_embed": param(
            rngs,
            _KERNEL_INIT,
            (num_modalities, dim),
            (None, "embed"),
            param_dtype,
        ),
    }

  def logits(self, params, x, modality, num_modalities):
    # As a one-hot product (its gradient a small matmul, not a scatter-add
    # over every token); as fast as jnp.take on the CPU measured, and kept
    # because the measured runs in README.md used it.
    one_hot = jax.nn.one_hot(modality, num_modalities, dtype=jnp.float32)
    b_m = jnp.einsum(
        "GSM,MD->GSD", one_hot, params["modality_embed"].astype(jnp.float32)
    )
    x_m = x.astype(jnp.float32) + b_m.astype(jnp.float32)
    # Eq. 6 in float32: small logit differences decide the top-k.
    logits = jnp.einsum(
        "GSD,DE->GSE", x_m, params["kernel"].astype(jnp.float32)
    )
    # The released checkpoints also feed x + b_m to the experts.
    return logits, (x_m if self.add_modality_to_experts else x)


@dataclasses.dataclass(frozen=True)
class PlainRouter:
  """g(x) = softmax(W x): a top-k router without the modality embedding
  (the ablation of the paper's Table 8)."""

  def params(self, rngs, dim, num_experts, num_modalities, param_dtype):
    del num_modalities
    return {
        "kernel": param(
            rngs, _KERNEL_INIT, (dim, num_experts), ("embed", None), param_dtype
        )
    }

  def logits(self, params, x, modality, num_modalities):
    del modality, num_modalities
    logits = jnp.einsum(
        "GSD,DE->GSE",
        x.astype(jnp.float32),
        params["kernel"].astype(jnp.float32),
    )
    return logits, x


ROUTERS = {
    "modality": lambda cfg: ModalityRouter(cfg.add_modality_to_experts),
    "plain": lambda cfg: PlainRouter(),
}


def make_router(cfg: MoEConfig) -> Router:
  """The router `cfg.router` names. Raises ValueError (one line)."""
  if cfg.router not in ROUTERS:
    raise ValueError(
        f"router {cfg.router!r} is not one of " f"{sorted(ROUTERS)}"
    )
  return ROUTERS[cfg.router](cfg)


@flax.struct.dataclass
class Routing:
  """A router's decision for G groups of S tokens, and its numbers.

  Attributes:
    dispatch: the `Dispatch` (choices, slots, gates).
    capacity: C, slots per expert per group (static; None: dropless).
    expert_input: [G, S, D] float32, what the experts get.
    stats: `MoEStats` (aux loss, dropped, routed, per-modality counts).
  """

  dispatch: Dispatch
  capacity: int | None = flax.struct.field(pytree_node=False)
  expert_input: jax.Array
  stats: MoEStats


def decide(
    router: Router,
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    x: jax.Array,
    modality: jax.Array,
    valid: jax.Array,
    num_modalities: int,
) -> Routing:
  """Routes tokens x [G, S, D] (modality ids and valid mask [G, S]) by
  `router`: logits -> top-K with capacity -> (renormalized) gates ->
  eq. 7 and the stats."""
  group_size = x.shape[1]
  logits, expert_input = router.logits(params, x, modality, num_modalities)
  if cfg.dispatch == "ragged":  # dropless: no capacity
    capacity = None
  else:
    capacity = expert_capacity(
        group_size,
        cfg.num_experts,
        cfg.top_k,
        cfg.capacity_factor,
        cfg.min_capacity,
    )
  d = route(logits, valid, cfg.top_k, capacity)
  if cfg.normalize_gates:
    d = normalize_gates(d)
  aux = load_balancing_loss(
      d.probs, d.expert_choice, valid, cfg.aux_loss_weight
  )
  return Routing(
      dispatch=d,
      capacity=capacity,
      expert_input=expert_input,
      stats=_stats(
          d, modality, valid, aux, cfg.top_k, cfg.num_experts, num_modalities
      ),
  )


def _stats(
    d: Dispatch,
    modality: jax.Array,
    valid: jax.Array,
    aux: jax.Array,
    top_k: int,
    num_experts: int,
    num_modalities: int,
) -> MoEStats:
  w = valid.astype(jnp.float32)
  routed = top_k * jnp.sum(w)
  dropped = routed - jnp.sum(d.kept.astype(jnp.float32))
  chosen = (
      jax.nn.one_hot(d.expert_choice, num_experts, dtype=jnp.float32)
      * w[:, :, None, None]
  )
  mod = jax.nn.one_hot(modality, num_modalities, dtype=jnp.float32)
  counts = jnp.einsum("GSKE,GSM->ME", chosen, mod)
  p = jax.lax.stop_gradient(d.probs)
  token_entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
  entropy = jnp.einsum("GS,GSM->M", token_entropy * w, mod)
  return MoEStats(
      aux_loss=aux,
      dropped=dropped,
      routed=routed,
      expert_counts=counts,
      router_entropy=entropy,
  )
