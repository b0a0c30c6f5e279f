"""Dropless experts (`moe_dispatch="ragged"`): every (token, choice) goes
to its expert, whatever the load; nothing is dropped and nothing is padded
to a capacity.

The layout: the T * K assignments of a shard's T tokens, ordered by expert
(stable: token order within an expert), each expert's run padded to a
multiple of `tile` rows, in one [R, D] buffer with a static
R = round_up(T * K, tile) + E * tile (the worst case of the padding).
`layout` computes, from the routing alone, the slot of every assignment
and the source of every slot; the buffer is built and read back with
dispatch.py's `gather_rows` (a gather both ways, forward and backward: the
custom VJP, never a scatter-add). Row r of the buffer belongs to expert
`row_expert[r]` (E: past the last expert's run, never read).

The experts' FFN over the buffer is a grouped matmul, two backends
(`GROUPED_MATMULS`, chosen by the target's platform):

  "ragged_dot"  jax.lax.ragged_dot with the padded run lengths as group
                sizes: XLA:TPU's native ragged dot (exact FLOPs in its cost
                analysis), over tiles of 8 rows: with a row count that is
                not a multiple of 8, XLA:TPU (libtpu 0.0.50.1) expands a
                ragged dot into E dense products by itself. On CPU and GPU
                XLA always expands it that way (E x the FLOPs): exact, but
                only for tests there.
  "tiles"       a scan over the buffer's [tile, D] row tiles, each run with
                its expert's weights (a tile holds one expert's rows): the
                FLOPs of the used tiles, at most (E - 1) * tile rows more
                than T * K (the empty tiles at the buffer's end skipped).
                Its VJP is written out (a scan back over the tiles, the
                weight gradients accumulated in float32), so nothing of
                the weights is saved per tile. XLA's cost analysis counts
                a loop body once: `eve_jax.aot.hlo.dot_flops` counts its dots by the
                loop's trip count.

Dimension legend (as in moe.py): T tokens (of a shard), K top-k, D model
width, F expert hidden, E experts, R buffer rows.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from eve_jax.model.dispatch import gather_rows


def auto_tile(assignments: int, num_experts: int) -> int:
  """Rows per tile for the "tiles" backend: the largest power of two (8
  to 128) with E * tile <= assignments / 8, so the padding adds at most
  12.5% rows where the shard has enough tokens."""
  tile = 128
  while tile > 8 and num_experts * tile * 8 > assignments:
    tile //= 2
  return tile


@flax.struct.dataclass
class Layout:
  """Where each assignment of T tokens x K choices sits in the [R, D]
  expert buffer.

  Attributes:
    slots: [T, K] int32 buffer row of each choice; R for a padding token
      (it is not routed).
    sources: [R] int32 assignment (token * K + choice) each row holds;
      T * K for a row that holds none.
    group_sizes: [E] int32 rows of each expert's run (padded to `tile`).
    row_expert: [R] int32 expert of each row; E past the last run.
    tile: rows per tile (static).
  """

  slots: jax.Array
  sources: jax.Array
  group_sizes: jax.Array
  row_expert: jax.Array
  tile: int = flax.struct.field(pytree_node=False)


def buffer_rows(assignments: int, num_experts: int, tile: int) -> int:
  """R: room for every assignment with each expert's run padded to `tile`."""
  return -(-assignments // tile) * tile + num_experts * tile


def ranks(
    choice: jax.Array, routed: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each assignment's expert and its rank among that expert's.

  Args:
    choice: [T, K] int32 experts of each token.
    routed: [T, K] bool, False for an assignment that gets no row.
    num_experts: E.

  Returns:
    ([N] int32 expert, E where not routed; [N] int32 rank within its
    expert in (token, choice) order; [E] int32 count per expert), with
    N = T * K.
  """
  e = num_experts
  n = choice.size
  # Unrouted assignments sort after every expert (id E) and get no row.
  expert = jnp.where(routed, choice, e).reshape(n).astype(jnp.int32)
  one_hot = (expert[:, None] == jnp.arange(e, dtype=jnp.int32)).astype(
      jnp.int32
  )
  counts = jnp.sum(one_hot, axis=0)  # [E]
  # An exclusive running count, no sort needed.
  rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
  return expert, rank, counts


def layout(
    choice: jax.Array,
    valid: jax.Array,
    num_experts: int,
    tile: int,
    keep: jax.Array | None = None,
) -> Layout:
  """The buffer layout of a routing.

  Args:
    choice: [T, K] int32 experts of each token, distinct per token.
    valid: [T] bool, False for padding tokens (not routed).
    num_experts: E.
    tile: rows per tile; each expert's run starts at a tile boundary.
    keep: optional [T, K] bool, False for an assignment left out (a
      bounded receive buffer's drop, ragged_shards.py): it gets no row,
      like a padding token's.

  Returns:
    A `Layout`.
  """
  t, k = choice.shape
  e = num_experts
  n = t * k
  rows = buffer_rows(n, e, tile)
  routed = jnp.broadcast_to(valid[:, None], (t, k))
  if keep is not None:
    routed = routed & keep
  expert, rank, counts = ranks(choice, routed, e)
  padded = -(-counts // tile) * tile
  start = jnp.cumsum(padded) - padded  # [E] first row of each run
  flat = jnp.where(
      expert < e, jnp.take(start, jnp.minimum(expert, e - 1)) + rank, rows
  )
  sources = (
      jnp.full((rows,), n, jnp.int32)
      .at[flat]
      .set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  )
  ends = jnp.cumsum(padded)
  row_expert = jnp.sum(
      jnp.arange(rows, dtype=jnp.int32)[:, None] >= ends[None, :], axis=1
  ).astype(jnp.int32)
  return Layout(
      slots=flat.reshape(t, k).astype(jnp.int32),
      sources=sources,
      group_sizes=padded.astype(jnp.int32),
      row_expert=row_expert,
      tile=tile,
  )


def to_buffer(x: jax.Array, lay: Layout) -> jax.Array:
  """[T, D] tokens -> [R, D] buffer (rows holding no token are 0)."""
  k = lay.slots.shape[1]  # sources // K: the token (T for an empty row)
  return gather_rows(x[None], lay.sources[None] // k, lay.slots[None])[0]


def from_buffer(out: jax.Array, lay: Layout, gates: jax.Array) -> jax.Array:
  """[R, D] expert outputs -> [T, D]: sum_k gate_k * out[slot_k]
  (padding tokens' gates are 0)."""
  t, k = lay.slots.shape
  picked = gather_rows(
      out[None], lay.slots.reshape(1, t * k), lay.sources[None, :, None]
  )[0]
  return jnp.einsum(
      "TKD,TK->TD", picked.reshape(t, k, -1), gates.astype(out.dtype)
  )


def _by_row(table: jax.Array, row_expert: jax.Array) -> jax.Array:
  """[E, X] per-expert vectors -> [R, X] each row's (0 past the last run):
  a one-hot product, whose gradient is a matmul, not a scatter-add."""
  one_hot = jax.nn.one_hot(row_expert, table.shape[0], dtype=table.dtype)
  return one_hot @ table


def ffn_ragged_dot(
    buf: jax.Array,
    lay: Layout,
    wi: jax.Array,
    bi: jax.Array,
    wo: jax.Array,
    bo: jax.Array,
    act: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """[R, D] -> [R, D]: each run through its expert's FFN by
  `jax.lax.ragged_dot` (rows past the last run come out as the bias of
  nothing: 0)."""
  h = jax.lax.ragged_dot(buf, wi, lay.group_sizes)
  h = act(h + _by_row(bi, lay.row_expert))
  out = jax.lax.ragged_dot(h, wo, lay.group_sizes)
  return out + _by_row(bo, lay.row_expert)


def ffn_tiles(
    buf: jax.Array,
    lay: Layout,
    wi: jax.Array,
    bi: jax.Array,
    wo: jax.Array,
    bo: jax.Array,
    act: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """[R, D] -> [R, D]: the FFN tile by tile, each tile with its expert's
  weights (module docstring, "tiles")."""
  rows, dim = buf.shape
  tile = lay.tile
  tile_expert = lay.row_expert[::tile]
  tiles = buf.reshape(rows // tile, tile, dim)
  out = _tiles_ffn(act, tiles, tile_expert, wi, bi, wo, bo)
  return out.reshape(rows, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiles_ffn(act, tiles, tile_expert, wi, bi, wo, bo):
  return _tiles_fwd(act, tiles, tile_expert, wi, bi, wo, bo)[0]


# Tiles past the last run (expert id E) hold no token: they are skipped
# (a cond in the loop body), their outputs left 0 and never read. The
# buffer's worst-case tail is E tiles, about half of them empty on average.


def _tiles_fwd(act, tiles, tile_expert, wi, bi, wo, bo):
  num_experts = wi.shape[0]

  def body(_, xs):
    x, e = xs

    def run(x, e):
      pre = x @ wi[e] + bi[e]
      return act(pre) @ wo[e] + bo[e], pre

    def skip(x, e):
      del e
      return jnp.zeros_like(x), jnp.zeros(x.shape[:1] + bi.shape[1:], x.dtype)

    return None, jax.lax.cond(e < num_experts, run, skip, x, e)

  _, (out, pre) = jax.lax.scan(body, None, (tiles, tile_expert))
  return out, (tiles, tile_expert, wi, bi, wo, bo, pre)


def _tiles_bwd(act, res, g_out):
  tiles, tile_expert, wi, bi, wo, bo, pre = res
  f32 = jnp.float32
  num_experts = wi.shape[0]

  def body(acc, xs):
    x, e, p, g = xs

    def run(acc, x, e, p, g):
      h, act_vjp = jax.vjp(act, p)
      g_h = g @ wo[e].T
      (g_pre,) = act_vjp(g_h)
      grads = (
          jnp.matmul(x.T, g_pre, preferred_element_type=f32),
          jnp.sum(g_pre, axis=0, dtype=f32),
          jnp.matmul(h.T, g, preferred_element_type=f32),
          jnp.sum(g, axis=0, dtype=f32),
      )
      acc = tuple(_add_at(a, e, d) for a, d in zip(acc, grads))
      return acc, g_pre @ wi[e].T

    def skip(acc, x, e, p, g):
      del e, p, g
      return acc, jnp.zeros_like(x)

    return jax.lax.cond(e < num_experts, run, skip, acc, x, e, p, g)

  zeros = tuple(jnp.zeros(w.shape, f32) for w in (wi, bi, wo, bo))
  acc, g_tiles = jax.lax.scan(body, zeros, (tiles, tile_expert, pre, g_out))
  d_wi, d_bi, d_wo, d_bo = (
      a.astype(w.dtype) for a, w in zip(acc, (wi, bi, wo, bo))
  )
  return g_tiles.astype(tiles.dtype), None, d_wi, d_bi, d_wo, d_bo


def _add_at(acc: jax.Array, e: jax.Array, delta: jax.Array) -> jax.Array:
  """acc[e] += delta, as an in-place dynamic update (not a scatter)."""
  row = jax.lax.dynamic_index_in_dim(acc, e, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(acc, row + delta, e, 0)


_tiles_ffn.defvjp(_tiles_fwd, _tiles_bwd)

GROUPED_MATMULS = {"ragged_dot": ffn_ragged_dot, "tiles": ffn_tiles}


def grouped_matmul_for(name: str, platform: str) -> str:
  """The backend `name` names; "auto": XLA's ragged dot on TPU, tiles on
  CPU and GPU (where XLA expands a ragged dot to E dense products)."""
  if name == "auto":
    return "ragged_dot" if platform == "tpu" else "tiles"
  if name not in GROUPED_MATMULS:
    raise ValueError(
        f"moe_grouped_matmul: expected 'auto' or one of "
        f"{sorted(GROUPED_MATMULS)}, got {name!r}"
    )
  return name


def experts_dropless(
    x: jax.Array,
    choice: jax.Array,
    gates: jax.Array,
    valid: jax.Array,
    wi: jax.Array,
    bi: jax.Array,
    wo: jax.Array,
    bo: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    backend: str,
    tile: int | None = None,
) -> jax.Array:
  """The MoE's expert part without capacity, on one shard's tokens.

  Args:
    x: [T, D] expert input (compute dtype).
    choice: [T, K] int32 experts per token.
    gates: [T, K] gates (0 for padding tokens).
    valid: [T] bool.
    wi, bi, wo, bo: [E, D, F], [E, F], [E, F, D], [E, D] expert weights.
    act: the experts' activation.
    backend: a GROUPED_MATMULS name.
    tile: rows per tile (default: 8 for "ragged_dot", `auto_tile` for
      "tiles").

  Returns:
    [T, D]: sum_k gate_k * FFN_{choice_k}(x).
  """
  t, k = choice.shape
  e = wi.shape[0]
  if tile is None:
    tile = 8 if backend == "ragged_dot" else auto_tile(t * k, e)
  lay = layout(choice, valid, e, tile)
  buf = to_buffer(x, lay)
  out = GROUPED_MATMULS[backend](buf, lay, wi, bi, wo, bo, act)
  return from_buffer(out, lay, gates)
