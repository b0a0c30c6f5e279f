"""Moving tokens to expert slots and back: the dispatchers.

A dispatcher (`DISPATCHERS`, chosen by `MoEConfig.dispatch`) turns a
routing decision into a plan, puts tokens [G, S, D] into the [E, G, C, D]
expert buffer by it and combines the experts' outputs back with the gates:

  "gather"  by index (below): no FLOPs, the layer costs the experts' FLOPs
            at capacity plus the router
  "einsum"  the one-hot einsums (vmoe's form): + 2*S*E*C*D FLOPs per group
            each way

The gather dispatcher:

`slot_maps` turns a `Dispatch` (router.py) into, per expert slot, the
token it holds, and per (token, choice), the slot it went to; the gathers
build the [E, G*C, D] expert buffer and combine the experts' outputs with
the gates. The gradient of each gather is a gather too (`gather_rows`'
custom VJP), not a scatter-add.

Dimension legend (as in moe.py):
  G groups, S group size, D model width, E experts, K top-k, C capacity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from eve_jax.model.router import Dispatch


def slot_maps(
    d: Dispatch, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
  """The index form of a routing, both ways.

  Returns:
    slots: [G, S, K] int32 flat slot e * C + c of each choice, E * C when
      the choice was dropped.
    sources: [G, E * C] int32 the (token, choice) each slot holds, as
      s * K + k, or S * K for an empty slot.
  """
  g, s, k = d.expert_choice.shape
  empty = num_experts * capacity
  slots = jnp.where(d.kept, d.expert_choice * capacity + d.position, empty)
  flat = jnp.arange(s * k, dtype=jnp.int32).reshape(1, s, k)
  sources = (
      jnp.full((g, empty), s * k, jnp.int32)
      .at[jnp.arange(g)[:, None, None], slots]
      .set(jnp.broadcast_to(flat, (g, s, k)), mode="drop")
  )
  return slots, sources


@jax.custom_vjp
def gather_rows(
    x: jax.Array, index: jax.Array, inverse: jax.Array
) -> jax.Array:
  """y[g, j] = x[g, index[g, j]] (index N = a zero row), for a one-to-many
  map whose transpose is given too, so the backward pass is a gather as
  well (the default, a scatter-add, is several times slower on CPU).

  Args:
    x: [G, N, D].
    index: [G, M] int32 in [0, N].
    inverse: [G, N, R] int32 in [0, M]: the rows j with index[g, j] == n,
      padded with M. Must be exactly consistent with `index`.

  Returns:
    [G, M, D].
  """
  return _take_rows(x, index)


def _take_rows(x, index):
  g, _, dim = x.shape
  x_pad = jnp.concatenate([x, jnp.zeros((g, 1, dim), x.dtype)], axis=1)
  return jnp.take_along_axis(x_pad, index[:, :, None], axis=1)


def _gather_rows_fwd(x, index, inverse):
  return _take_rows(x, index), (index, inverse)


def _gather_rows_bwd(res, g_y):
  index, inverse = res
  g, n, r = inverse.shape
  picked = _take_rows(g_y, inverse.reshape(g, n * r))
  g_x = picked.reshape(g, n, r, g_y.shape[-1]).sum(2)
  return g_x, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def gather_dispatch(
    x: jax.Array,
    slots: jax.Array,
    sources: jax.Array,
    num_experts: int,
    capacity: int,
) -> jax.Array:
  """[G, S, D] tokens -> [G, E, C, D] expert buffer, empty slots zero.

  A gather: no FLOPs, unlike the one-hot einsum whose cost grows with S.
  `slots`, `sources`: from `slot_maps`.
  """
  g, _, dim = x.shape
  k = slots.shape[-1]
  buf = gather_rows(x, sources // k, slots)  # sources // K: the token
  return buf.reshape(g, num_experts, capacity, dim)


def gather_combine(
    out: jax.Array, slots: jax.Array, sources: jax.Array, gates: jax.Array
) -> jax.Array:
  """[G, E, C, D] expert outputs -> [G, S, D]: sum_k gate_k * out[e_k, c_k]
  over each token's kept choices (`gates` 0 where dropped)."""
  g, e, c, dim = out.shape
  _, s, k = slots.shape
  picked = gather_rows(
      out.reshape(g, e * c, dim), slots.reshape(g, s * k), sources[:, :, None]
  )
  return jnp.einsum(
      "GSKD,GSK->GSD", picked.reshape(g, s, k, dim), gates.astype(out.dtype)
  )


class Dispatcher(Protocol):
  """Tokens to expert slots and back, for one routing decision."""

  def plan(self, d: Dispatch, num_experts: int, capacity: int) -> Any:
    """What `dispatch` and `combine` need of the decision."""

  def dispatch(self, x: jax.Array, plan: Any) -> jax.Array:
    """[G, S, D] tokens -> [E, G, C, D] expert buffer, empty slots 0."""

  def combine(self, out: jax.Array, plan: Any) -> jax.Array:
    """[E, G, C, D] expert outputs -> [G, S, D], gate-weighted."""


@dataclasses.dataclass(frozen=True)
class GatherDispatcher:
  """By index: `slot_maps`, then `gather_dispatch` / `gather_combine`."""

  def plan(self, d, num_experts, capacity):
    slots, sources = slot_maps(d, num_experts, capacity)
    return slots, sources, d.gates, num_experts, capacity

  def dispatch(self, x, plan):
    slots, sources, _, num_experts, capacity = plan
    return jnp.swapaxes(
        gather_dispatch(x, slots, sources, num_experts, capacity), 0, 1
    )

  def combine(self, out, plan):
    slots, sources, gates, _, _ = plan
    return gather_combine(jnp.swapaxes(out, 0, 1), slots, sources, gates)


@dataclasses.dataclass(frozen=True)
class EinsumDispatcher:
  """The one-hot `Dispatch.dispatch` / `combine` tensors in einsums:
  G*S*E*C*D multiply-adds each way."""

  def plan(self, d, num_experts, capacity):
    del num_experts, capacity
    return d

  def dispatch(self, x, plan):
    return jnp.einsum("GSEC,GSD->EGCD", plan.dispatch.astype(x.dtype), x)

  def combine(self, out, plan):
    return jnp.einsum("GSEC,EGCD->GSD", plan.combine.astype(out.dtype), out)


DISPATCHERS = {"gather": GatherDispatcher, "einsum": EinsumDispatcher}


def make_dispatcher(name: str) -> Dispatcher:
  """The dispatcher `name` names. Raises ValueError (one line)."""
  if name not in DISPATCHERS:
    raise ValueError(
        f"dispatch: expected one of {sorted(DISPATCHERS)}, got " f"{name!r}"
    )
  return DISPATCHERS[name]()
