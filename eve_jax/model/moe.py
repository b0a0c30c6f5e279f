"""Modality-aware feed-forward layers: soft-router MoE and hard-router FFN.

EVE paper eqs. 4-7: g(x) = softmax(W (x + b_m)), MoE(x) = sum_topk g(x)_i FFN_i,
L_aux = alpha * E * sum_i f_i p_i. Router (router.py: logits, choices,
gates, capacity, eq. 7, stats) -> `Dispatch` -> a dispatcher (dispatch.py:
gather or einsum) -> stacked experts (here, batched or unrolled) ->
combine, each a separate, separately tested piece (the vmoe layout), all
set by one `MoEConfig` (moe_config.py).

Dimension legend (every einsum below is written in these letters):
  B batch, L sequence, D model width, F expert hidden, E experts, K top-k,
  G groups, S group size, C capacity, M modalities (0 = image, 1 = text).

Parameters carry logical axis names as metadata only (`eager_sharding=False`):
the caller turns them into shardings (`nnx.get_partition_spec` -> jitted init
with `out_shardings`), so building a layer needs no mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from eve_jax.model.layers import activation_fn as gelu_fn
from eve_jax.model.layers import layer_norm, param
from eve_jax.model import ragged, ragged_shards
from eve_jax.model.dispatch import make_dispatcher
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.router import MoEStats, Routing, decide, make_router
from eve_jax.sharding import (
    batch_spec,
    constrain,
    logical_size,
    logical_to_spec,
    target_platform,
)

_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


class ModalityMoE(nnx.Module):
  """Soft-router layer: E experts, top-K, a router from `cfg.router`
  (eqs. 4-7): router (router.py) -> dispatcher (dispatch.py) -> experts
  (here) -> combine.

  Groups are one sample each (G = B, S = L) and padding is never routed:
  `cfg.group="batch"` makes all B * L tokens of a call one group (G = 1,
  S = B * L) and `cfg.route_padding` routes padding tokens like any other
  (they take slots), which with `min_capacity=4` is what the released
  EVE's DeepSpeed layer computes; a reproduction switch, not one for
  training (one group cannot be split over devices). The block owns the
  LayerNorm in front of this layer and adds the residual.

  Parameters: the router's (router.py; "modality": `kernel` [D, E] and
  `modality_embed` [M, D]) and the experts' `wi` [E, D, F], `bi` [E, F],
  `wo` [E, F, D], `bo` [E, D].
  """

  def __init__(
      self,
      dim: int,
      hidden: int,
      cfg: MoEConfig,
      *,
      num_modalities: int = 2,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if not 1 <= cfg.top_k <= cfg.num_experts:
      raise ValueError(
          f"top_k: expected 1..{cfg.num_experts}, got " f"{cfg.top_k}"
      )
    if cfg.experts not in ("auto", "batched", "unrolled"):
      raise ValueError(
          f"experts: expected 'auto', 'batched' or 'unrolled', "
          f"got {cfg.experts!r}"
      )
    if cfg.group not in ("sample", "batch"):
      raise ValueError(
          f"group: expected 'sample' or 'batch', got " f"{cfg.group!r}"
      )
    gelu_fn(cfg.activation)  # fail early on a bad name
    self.cfg = cfg
    self.router = make_router(cfg)
    # "ragged" (dropless, ragged.py) has no capacity buffer to dispatch to.
    self.dispatcher = (
        None if cfg.dispatch == "ragged" else make_dispatcher(cfg.dispatch)
    )
    if cfg.dispatch == "ragged":
      ragged.grouped_matmul_for(cfg.grouped_matmul, "cpu")  # fail early
    self.num_modalities = num_modalities
    self.dtype = dtype
    e, d, f = cfg.num_experts, dim, hidden
    self.router_params = tuple(
        self._set_params(
            self.router.params(rngs, dim, e, num_modalities, param_dtype)
        )
    )
    self.wi = param(
        rngs, _KERNEL_INIT, (e, d, f), ("expert", "embed", "mlp"), param_dtype
    )
    self.bi = param(rngs, _ZEROS, (e, f), ("expert", "mlp"), param_dtype)
    self.wo = param(
        rngs, _KERNEL_INIT, (e, f, d), ("expert", "mlp", "embed"), param_dtype
    )
    self.bo = param(rngs, _ZEROS, (e, d), ("expert", "embed"), param_dtype)

  def _set_params(self, params: dict[str, nnx.Param]):
    """The router's parameters as attributes of this layer (checkpoints
    and converters know them by these paths); yields their names."""
    for name, p in params.items():
      setattr(self, name, p)
      yield name

  # Read by code that inspects routing (viz, tests) under the old names.
  num_experts = property(lambda self: self.cfg.num_experts)
  top_k = property(lambda self: self.cfg.top_k)

  def __call__(
      self, x: jax.Array, modality: jax.Array, valid: jax.Array
  ) -> tuple[jax.Array, MoEStats]:
    """Applies the MoE.

    Args:
      x: [B, L, D] tokens (already layer-normed by the block).
      modality: [B, L] int modality ids in [0, M).
      valid: [B, L] bool, False for padding tokens (their output is 0
        unless `route_padding`).

    Returns:
      y: [B, L, D] in `dtype`, and `MoEStats` (over the routed tokens).
    """
    shape = x.shape
    if self.cfg.group == "batch":  # [B, L, ...] -> [1, B * L, ...]
      x, modality, valid = (
          a.reshape((1, -1) + a.shape[2:]) for a in (x, modality, valid)
      )
    valid = valid.astype(bool)
    if self.cfg.route_padding:
      valid = jnp.ones_like(valid)
    y, stats = self._groups(x, modality, valid)
    return y.reshape(shape[:2] + y.shape[2:]), stats

  def _groups(
      self, x: jax.Array, modality: jax.Array, valid: jax.Array
  ) -> tuple[jax.Array, MoEStats]:
    """`__call__` on [G, S, D] groups: each routed on its own."""
    with jax.named_scope("router"):
      params = {n: getattr(self, n)[...] for n in self.router_params}
      r = decide(
          self.router, params, self.cfg, x, modality, valid, self.num_modalities
      )
    if self.dispatcher is None:
      with jax.named_scope("experts"):
        y, dropped = self._dropless(r, valid)
      return y, r.stats.replace(dropped=r.stats.dropped + dropped)
    with jax.named_scope("experts"):
      plan = self.dispatcher.plan(r.dispatch, self.cfg.num_experts, r.capacity)
      buf = self.dispatcher.dispatch(r.expert_input.astype(self.dtype), plan)
      # Dispatch where the groups are (split over act_batch = data x fsdp x
      # expert), then move the buffer to experts x act_group: resharding
      # between the two layouts is an all-to-all on `expert`. Constraining
      # only the second makes GSPMD all-gather the tokens instead.
      buf = constrain(buf, (None, "act_batch", None, "act_embed"))
      buf = constrain(buf, ("act_expert", "act_group", None, "act_embed"))
      out = self._experts(buf)
      out = constrain(out, (None, "act_batch", None, "act_embed"))  # and back
      y = self.dispatcher.combine(out, plan)
      y = constrain(y, ("act_batch", "act_seq", "act_embed"))
    return y, r.stats

  def _dropless(
      self, r: Routing, valid: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """([G, S, D] output, float32 assignments dropped) of the dropless
    experts on each device's own groups: a shard_map over the batch's mesh
    axes, so the sort by expert stays on the device that holds the
    tokens. Experts not sharded
    (ragged.py): the weights enter whole (replicated; the shard_map's
    transpose sums their gradients over the batch axes). Experts sharded
    over `expert` (ragged_shards.py): each device keeps its experts'
    weights and the tokens travel to them and back, into receive buffers
    of `ragged_buffer_factor` times a device's assignments if set (the
    only case where anything is dropped)."""
    platform = target_platform()
    backend = ragged.grouped_matmul_for(self.cfg.grouped_matmul, platform)
    act = gelu_fn(self.cfg.activation)
    weights = tuple(
        w[...].astype(self.dtype) for w in (self.wi, self.bi, self.wo, self.bo)
    )
    x = r.expert_input.astype(self.dtype)
    d = r.dispatch
    e = self.cfg.num_experts
    mesh = jax.sharding.get_abstract_mesh()
    expert_axes = _expert_axes(mesh, e)
    spec = batch_spec(x.shape[0])  # P(batch axes) or P(None): unsplittable
    batch_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    if not set(expert_axes) <= set(batch_axes):
      # Too few groups to split over the expert axes too (e.g. a small
      # evaluation batch): the experts' weights gathered for this call,
      # every device running all experts on its own tokens.
      expert_axes = ()

    def local(x, choice, gates, valid, *weights):
      g, s, dim = x.shape
      flat = (
          x.reshape(g * s, dim),
          choice.reshape(g * s, -1),
          gates.reshape(g * s, -1),
          valid.reshape(g * s),
      )
      dropped = jnp.zeros((), jnp.float32)
      if expert_axes:
        y, dropped = ragged_shards.experts_dropless_sharded(
            *flat,
            *weights,
            num_experts=e,
            axes=expert_axes,
            act=act,
            backend=backend,
            exchange_impl=ragged_shards.exchange_for(platform),
            capacity=receive_rows(choice.size, self.cfg.ragged_buffer_factor),
        )
        dropped = jax.lax.psum(dropped, batch_axes)
      else:
        y = ragged.experts_dropless(*flat, *weights, act=act, backend=backend)
      return y.reshape(g, s, dim), dropped

    args = (x, d.expert_choice, d.gates, valid)
    if mesh.empty or mesh.size == 1:
      return local(*args, *weights)
    rows = [P(spec[0], *(None,) * (a.ndim - 1)) for a in args]
    # The weights' expert dim stays split (None: replicated); the rest is
    # gathered at the boundary, as for any use of an FSDP-sharded weight.
    w_specs = [P(expert_axes or None, *(None,) * (w.ndim - 1)) for w in weights]
    return jax.shard_map(
        local,
        in_specs=(*rows, *w_specs),
        out_specs=(rows[0], P()),
        # Unchecked: jax 0.12's exact gelu (erfc) fails the varying-axes
        # check when replicated weights meet sharded tokens. Without it the
        # transpose sums the replicated weights' gradients over the batch
        # axes all the same (tests/test_ragged.py compares them).
        check_vma=False,
    )(*args, *weights)

  def _experts(self, buf: jax.Array) -> jax.Array:
    """[E, G, C, D] -> [E, G, C, D]: expert e's FFN on its slots."""
    # One [G*C, D] x [D, F] product per expert (N = G*C): with G and C
    # as separate dims XLA:CPU's backward ran 1.4x slower (measured).
    e, g, c, dim = buf.shape
    tokens = buf.reshape(e, g * c, dim)
    act = gelu_fn(self.cfg.activation)
    wi, wo = self.wi[...].astype(self.dtype), self.wo[...].astype(self.dtype)
    bi, bo = self.bi[...].astype(self.dtype), self.bo[...].astype(self.dtype)
    if experts_unrolled(self.cfg.experts):
      # E plain [N, D] x [D, F] products: XLA:CPU runs them ~1.3x faster
      # than the batched einsum below (measured on the small model).
      # lax.split, not x[i]: the transpose of a split is one concatenate,
      # that of E slices is E zero-padded full-size adds.
      parts = [
          jax.lax.split(a, [1] * e, axis=0) for a in (tokens, wi, bi, wo, bo)
      ]
      out = jnp.concatenate(
          [
              act(t[0] @ w1[0] + b1[0]) @ w2[0] + b2[0]
              for t, w1, b1, w2, b2 in zip(*parts)
          ]
      )
      out = out.reshape(e, g * c, dim)
    else:
      h = jnp.einsum("END,EDF->ENF", tokens, wi)
      h = act(h + bi[:, None, :])
      h = constrain(h, ("act_expert", "act_group", "act_mlp"))
      out = jnp.einsum("ENF,EFD->END", h, wo)
      out = out + bo[:, None, :]
    return constrain(
        out.reshape(e, g, c, dim),
        ("act_expert", "act_group", None, "act_embed"),
    )


def receive_rows(assignments: int, factor: float) -> int | None:
  """Rows of a device's bounded receive buffer: `factor` times its own
  T * K assignments, rounded up to 8 (a TPU sublane tile); None for
  factor 0 (the worst case)."""
  if not factor:
    return None
  return -(-math.ceil(factor * assignments) // 8) * 8


def _expert_axes(mesh, num_experts: int) -> tuple[str, ...]:
  """The mesh axes the experts' dim is split over under the active rules
  (() on no mesh or where they are not split)."""
  if mesh.empty:
    return ()
  rules = flax_spmd.get_logical_axis_rules()
  axes = logical_to_spec(("expert",), (num_experts,), rules, dict(mesh.shape))
  axes = axes[0]
  return () if axes is None else (axes if isinstance(axes, tuple) else (axes,))


def experts_unrolled(mode: str) -> bool:
  """Whether the experts run as E separate matmuls: `mode` "unrolled", or
  "auto" where it pays (CPU) and is harmless (experts not sharded: with
  experts over devices, one batched einsum keeps each expert on its
  device). The target's platform (the mesh's devices), not the host's:
  compiling for a TPU from a CPU machine must build the TPU program."""
  if mode == "auto":
    return target_platform() == "cpu" and logical_size("act_expert") == 1
  return mode == "unrolled"


class ModalityFFN(nnx.Module):
  """Hard-router layer: one pre-LayerNorm FFN per modality, picked by id.

  No router, no capacity, nothing dropped; y = FFN_m(LN_m(x)) for each token's
  own modality m. The caller adds the residual.
  """

  def __init__(
      self,
      dim: int,
      hidden: int,
      *,
      num_modalities: int = 2,
      activation: str = "gelu",
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.num_modalities = num_modalities
    gelu_fn(activation)  # fail early on a bad name
    self.activation = activation
    self.dtype = dtype
    m, d, f = num_modalities, dim, hidden
    self.norm_scale = param(rngs, _ONES, (m, d), (None, "embed"), param_dtype)
    self.norm_bias = param(rngs, _ZEROS, (m, d), (None, "embed"), param_dtype)
    self.wi = param(
        rngs, _KERNEL_INIT, (m, d, f), (None, "embed", "mlp"), param_dtype
    )
    self.bi = param(rngs, _ZEROS, (m, f), (None, "mlp"), param_dtype)
    self.wo = param(
        rngs, _KERNEL_INIT, (m, f, d), (None, "mlp", "embed"), param_dtype
    )
    self.bo = param(rngs, _ZEROS, (m, d), (None, "embed"), param_dtype)

  def _ffn(self, x: jax.Array, m: int) -> jax.Array:
    """FFN_m(LN_m(x)) for x [B, L, D]."""
    dt = self.dtype
    h = layer_norm(x, self.norm_scale[...][m], self.norm_bias[...][m], dt)
    h = jnp.einsum("BLD,DF->BLF", h, self.wi[...][m].astype(dt))
    h = gelu_fn(self.activation)(h + self.bi[...][m].astype(dt))
    h = jnp.einsum("BLF,FD->BLD", h, self.wo[...][m].astype(dt))
    return h + self.bo[...][m].astype(dt)

  def __call__(
      self,
      x: jax.Array,
      modality: jax.Array,
      counts: tuple[int, ...] | None = None,
  ) -> jax.Array:
    """Applies each token's own modality FFN.

    Args:
      x: [B, L, D] tokens.
      modality: [B, L] int modality ids in [0, M), in any order.
      counts: static number of tokens of each modality in EVERY sequence,
        e.g. (1 + num_image_patches, text_len); sum(counts) must be L. Given,
        tokens are gathered per modality and each FFN runs on its own tokens
        only (FLOPs of one FFN per token). The ids are trusted to match: a
        sequence with other counts would send tokens to the wrong FFN.
        None: every FFN runs on every token and the right one is selected
        (M times the FLOPs).

    Returns:
      [B, L, D] in `dtype`.
    """
    _, length, _ = x.shape
    if counts is None:
      outs = jnp.stack([self._ffn(x, m) for m in range(self.num_modalities)])
      return jnp.take_along_axis(outs, modality[None, :, :, None], axis=0)[0]
    counts = tuple(int(c) for c in counts)
    if len(counts) != self.num_modalities or sum(counts) != length:
      raise ValueError(
          f"ModalityFFN counts: expected {self.num_modalities} ints summing to "
          f"the sequence length {length}, got {counts}"
      )
    # A stable sort by id puts modality m's tokens at [sum(counts[:m]), ...).
    perm = jnp.argsort(modality, axis=-1, stable=True)  # [B, L]
    xs = jnp.take_along_axis(x, perm[:, :, None], axis=1)
    pieces, start = [], 0
    for m, n in enumerate(counts):
      if n:
        pieces.append(self._ffn(xs[:, start : start + n], m))
      start += n
    ys = jnp.concatenate(pieces, axis=1)
    inverse = jnp.argsort(perm, axis=-1)
    return jnp.take_along_axis(ys, inverse[:, :, None], axis=1)
