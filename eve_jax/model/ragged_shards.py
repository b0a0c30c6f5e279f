"""Dropless experts sharded over devices: `moe_dispatch="ragged"` with the
experts split over the `expert` mesh axes (X devices, E / X experts each).

Inside the MoE's shard_map every device holds T tokens of the batch and
El = E / X experts' weights; device j owns experts [j * El, (j + 1) * El).
One layer, per device:

  1. sort: the T * K assignments ordered by expert (ragged.layout with
     tile 1: packed, no padding), so the rows bound for each device are one
     contiguous run;
  2. counts: the [E] assignments per expert, all-gathered over the expert
     axes into [X, E], from which every device computes every offset of the
     exchange (`Route`) without another collective;
  3. exchange: each run to its device (`exchange`: XLA's ragged all-to-all
     on TPU and GPU; on CPU, where that collective does not run, an exact
     dense form with worst-case slabs). A device receives at most X * T * K
     rows (every source sending it everything), a static buffer; or, with
     a `capacity` (config `moe_ragged_buffer_factor`), at most that many:
     then the runs a device is sent past it are cut at their source
     (`bounded_counts`), dropped and counted;
  4. regroup: the received rows (source-major, expert-minor) reordered by
     local expert with runs padded to a tile (ragged.layout again), the
     grouped matmul with the local experts' weights (ragged.py's backends),
     and the rows put back in received order;
  5. exchange back (the same route reversed), unsort and combine with the
     gates (ragged.from_buffer).

Without a capacity nothing is dropped; no expert weight leaves its device. Every data
movement is a gather or an exchange whose VJP is the reverse exchange
(custom VJPs, no scatter-add), as in ragged.py.

Dimension legend: T tokens (of a device), K top-k, N = T * K assignments,
D model width, E experts, El = E / X local experts, X expert-axis devices.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from eve_jax.model import ragged


@flax.struct.dataclass
class Route:
  """One device's view of an exchange over the X expert-axis devices: rows
  `[send_off[j], send_off[j] + send_size[j])` of its operand go to device j
  and land at `dest_off[j]` there; what device s sends it lands at
  `recv_off[s]` (`recv_size[s]` rows), taken from `src_off[s]` of s's
  operand. All [X] int32."""

  send_off: jax.Array
  send_size: jax.Array
  dest_off: jax.Array
  recv_off: jax.Array
  recv_size: jax.Array
  src_off: jax.Array

  def reverse(self) -> Route:
    """The route that sends every received row back where it came from."""
    return Route(
        send_off=self.recv_off,
        send_size=self.recv_size,
        dest_off=self.src_off,
        recv_off=self.send_off,
        recv_size=self.send_size,
        src_off=self.dest_off,
    )


def route(counts: jax.Array, me: jax.Array, local_experts: int) -> Route:
  """The route of step 3 from the all-gathered counts.

  Args:
    counts: [X, E] int32 assignments of source device s to expert e.
    me: this device's index on the expert axes.
    local_experts: El (E = X * El).

  Returns:
    The `Route` that takes each device's expert-sorted, packed rows to the
    experts' devices, received source-major (all of device 0's rows first).
  """
  x = counts.shape[0]
  # to[s, j]: rows device s sends device j (its experts' counts summed).
  to = counts.reshape(x, x, local_experts).sum(axis=2)
  excl = lambda a, axis: jnp.cumsum(a, axis=axis) - a
  # Where s's rows for j start in s's sorted buffer / in j's receive buffer.
  start_at_source = excl(to, 1)
  start_at_dest = excl(to, 0)
  return Route(
      send_off=start_at_source[me],
      send_size=to[me],
      dest_off=start_at_dest[me],
      recv_off=start_at_dest[:, me],
      recv_size=to[:, me],
      src_off=start_at_source[:, me],
  )


def bounded_counts(
    counts: jax.Array, capacity: int, local_experts: int, max_count: int
) -> jax.Array:
  """[X, E] counts -> the [X, E] counts each receive buffer of `capacity`
  rows takes: for each destination device, the (source, local expert)
  runs it is sent are cut to one common level, the largest with their sum
  <= capacity (max-min fair: the longest runs are cut first, a run under
  the level is whole).

  Args:
    counts: [X, E] int32 assignments of source device s to expert e.
    capacity: rows of a device's receive buffer.
    local_experts: El (E = X * El).
    max_count: a bound on any count (a shard's tokens T).
  """
  x = counts.shape[0]
  runs = counts.reshape(x, x, local_experts)  # [source, dest, local expert]

  def taken(level):  # [X] level per destination -> [X] rows it takes
    return jnp.sum(jnp.minimum(runs, level[None, :, None]), axis=(0, 2))

  # The largest level that fits, bit by bit from the top (taken() grows
  # with the level): about log2(T) steps on [X, X, El] integers.
  level = jnp.zeros((x,), jnp.int32)
  for bit in reversed(range(max(int(max_count), 1).bit_length())):
    higher = level | (1 << bit)
    level = jnp.where(taken(higher) <= capacity, higher, level)
  return jnp.minimum(runs, level[None, :, None]).reshape(counts.shape)


# -- The exchange ------------------------------------------------------------


def _ragged_all_to_all(x, out_rows, r: Route, axes):
  out = jnp.zeros((out_rows,) + x.shape[1:], x.dtype)
  return jax.lax.ragged_all_to_all(
      x, out, r.send_off, r.send_size, r.dest_off, r.recv_size, axis_name=axes
  )


def _dense_all_to_all(x, out_rows, r: Route, axes):
  """ragged_all_to_all's result by a dense all_to_all: each run sent in a
  slab as long as the whole operand (the worst case), then placed where
  its sender said (`dest_off`, exchanged as ragged_all_to_all does)."""
  m = x.shape[0]
  ndev = r.send_off.shape[0]
  rows = jnp.arange(m, dtype=jnp.int32)
  src = r.send_off[:, None] + rows[None, :]  # [X, m]
  sent = rows[None, :] < r.send_size[:, None]
  trail = (1,) * (x.ndim - 1)  # broadcast a row mask over a row's dims
  slabs = jnp.where(
      sent.reshape(sent.shape + trail),
      jnp.take(x, jnp.clip(src, 0, m - 1), axis=0),
      0,
  )
  slabs = jax.lax.all_to_all(slabs, axes, 0, 0, tiled=False)  # [X, m, ...]
  at = jax.lax.all_to_all(r.dest_off, axes, 0, 0, tiled=True)  # [X]
  q = jnp.arange(out_rows, dtype=jnp.int32)[:, None]  # [out_rows, 1]
  inside = (q >= at[None, :]) & (q < at[None, :] + r.recv_size[None, :])
  s = jnp.argmax(inside, axis=1).astype(jnp.int32)
  flat = s * m + jnp.clip(q[:, 0] - jnp.take(at, s), 0, m - 1)
  got = jnp.take(slabs.reshape((ndev * m,) + x.shape[1:]), flat, axis=0)
  return jnp.where(jnp.any(inside, axis=1).reshape((-1,) + trail), got, 0)


_EXCHANGES = {
    "ragged_all_to_all": _ragged_all_to_all,
    "dense": _dense_all_to_all,
}


def exchange_for(platform: str) -> str:
  """XLA's ragged all-to-all on TPU and GPU; the dense form on CPU, where
  ragged_all_to_all does not run."""
  return "dense" if platform == "cpu" else "ragged_all_to_all"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def exchange(impl: str, out_rows: int, axes, x: jax.Array, r: Route):
  """[m, ...] rows -> [out_rows, ...]: the runs of `r` moved between the
  devices of `axes` (rows no run lands on are 0). Its VJP is the same
  exchange along `r.reverse()`."""
  return _EXCHANGES[impl](x, out_rows, r, axes)


def _exchange_fwd(impl, out_rows, axes, x, r):
  return exchange(impl, out_rows, axes, x, r), (x.shape[0], r)


def _exchange_bwd(impl, out_rows, axes, res, g):
  del out_rows
  in_rows, r = res
  zero = jax.tree.map(lambda a: None, r)
  return exchange(impl, in_rows, axes, g, r.reverse()), zero


exchange.defvjp(_exchange_fwd, _exchange_bwd)


# -- The layer ----------------------------------------------------------------


def received_experts(
    counts: jax.Array, me: jax.Array, local_experts: int, rows: int
) -> tuple[jax.Array, jax.Array]:
  """The local expert of each row of the receive buffer.

  Rows arrive source-major and, within a source, by expert (step 1's
  order): the (source, local expert) runs follow each other packed.

  Returns:
    ([rows] int32 local expert, [rows] bool row holds an assignment).
  """
  x = counts.shape[0]
  mine = jax.lax.dynamic_slice_in_dim(
      counts, me * local_experts, local_experts, axis=1
  )  # [X, El]
  ends = jnp.cumsum(mine.reshape(x * local_experts))  # (source, expert) runs
  q = jnp.arange(rows, dtype=jnp.int32)
  run = jnp.sum(q[:, None] >= ends[None, :], axis=1).astype(jnp.int32)
  return run % local_experts, q < ends[-1]


def experts_dropless_sharded(
    x: jax.Array,
    choice: jax.Array,
    gates: jax.Array,
    valid: jax.Array,
    wi: jax.Array,
    bi: jax.Array,
    wo: jax.Array,
    bo: jax.Array,
    *,
    num_experts: int,
    axes: str | Sequence[str],
    act: Callable[[jax.Array], jax.Array],
    backend: str,
    exchange_impl: str,
    capacity: int | None = None,
    tile: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """ragged.experts_dropless with this device's experts only, inside a
  shard_map over (at least) the expert axes `axes`.

  With `capacity` (rows of each device's receive buffer, a bound below
  the worst case X * T * K) a device sent more rows than that takes its
  (source, expert) runs cut to one level (`bounded_counts`): the
  assignments past the cut (a run's last tokens) are dropped at their
  source before the exchange, contribute 0 like a capacity drop, and are
  counted.

  Args:
    x: [T, D] expert input; choice, gates: [T, K]; valid: [T] (as in
      ragged.experts_dropless).
    wi, bi, wo, bo: the local experts' weights, [El, D, F], [El, F],
      [El, F, D], [El, D].
    num_experts: E over all devices.
    axes: the mesh axes the experts are split over (X devices in all).
    exchange_impl: an `exchange` implementation ("ragged_all_to_all",
      "dense").

  Returns:
    ([T, D] sum_k gate_k * FFN_{choice_k}(x) over the kept choices,
    float32 scalar: this device's assignments dropped, 0 without
    `capacity`).
  """
  t, k = choice.shape
  n = t * k
  el = wi.shape[0]
  ndev = num_experts // el
  me = jax.lax.axis_index(axes)
  routed = jnp.broadcast_to(valid[:, None], (t, k))
  expert, rank, counts = ragged.ranks(choice, routed, num_experts)
  # 1. Counts of every device (what decides the route and any cut).
  counts = jax.lax.all_gather(counts, axes, tiled=False)
  counts = counts.reshape(ndev, num_experts)
  received = ndev * n  # the worst case: every source sends a device all
  keep, dropped = None, jnp.zeros((), jnp.float32)
  if capacity is not None and capacity < received:
    received = capacity
    kept = bounded_counts(counts, capacity, el, t)
    mine = jnp.take(kept[me], jnp.minimum(expert, num_experts - 1))
    keep = (rank < mine).reshape(t, k)
    counts = kept
    dropped = jnp.sum(routed & ~keep, dtype=jnp.float32)
  # 2. Sort by expert, packed, and the route.
  sort = ragged.layout(choice, valid, num_experts, 1, keep=keep)
  sorted_rows = ragged.to_buffer(x, sort)  # [n + E, D]
  r = route(counts, me, el)
  # 3. To the experts' devices.
  recv = exchange(exchange_impl, received, axes, sorted_rows, r)
  # 4. By local expert, through the experts, back in received order.
  expert, real = received_experts(counts, me, el, received)
  if tile is None:
    tile = 8 if backend == "ragged_dot" else ragged.auto_tile(n, el)
  group = ragged.layout(expert[:, None], real, el, tile)
  buf = ragged.to_buffer(recv, group)
  out = ragged.GROUPED_MATMULS[backend](buf, group, wi, bi, wo, bo, act)
  back = ragged.from_buffer(out, group, real[:, None].astype(out.dtype))
  # 5. Home, unsorted, combined.
  home = exchange(exchange_impl, sorted_rows.shape[0], axes, back, r.reverse())
  return ragged.from_buffer(home, sort, gates), dropped
