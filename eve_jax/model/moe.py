"""Modality-aware feed-forward layers: soft-router MoE and hard-router FFN.

EVE paper eqs. 4-7: g(x) = softmax(W (x + b_m)), MoE(x) = sum_topk g(x)_i FFN_i,
L_aux = alpha * E * sum_i f_i p_i. Router (router.py: choices, gates,
capacity, eq. 7) -> `Dispatch` -> the gather dispatcher (dispatch.py) ->
stacked experts (here), each a separate, separately tested piece (the vmoe
layout).

Dimension legend (every einsum below is written in these letters):
  B batch, L sequence, D model width, F expert hidden, E experts, K top-k,
  G groups, S group size, C capacity, M modalities (0 = image, 1 = text).

Parameters carry logical axis names as metadata only (`eager_sharding=False`):
the caller turns them into shardings (`nnx.get_partition_spec` -> jitted init
with `out_shardings`), so building a layer needs no mesh.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.layers import activation_fn as gelu_fn
from eve_jax.model.layers import layer_norm, param
from eve_jax.model.dispatch import gather_combine, gather_dispatch, slot_maps
from eve_jax.model.router import (Dispatch, expert_capacity,
                                  load_balancing_loss, normalize_gates, route)
from eve_jax.sharding import constrain, logical_size, target_platform

_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.02)
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


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
  """
  aux_loss: jax.Array
  dropped: jax.Array
  routed: jax.Array
  expert_counts: jax.Array


class ModalityMoE(nnx.Module):
  """Soft-router layer: E experts, top-K, modality-aware router (eqs. 4-7).

  Groups are one sample each (G = B, S = L) and padding is never routed:
  `group="batch"` makes all B * L tokens of a call one group (G = 1, S =
  B * L) and `route_padding` routes padding tokens like any other (they
  take slots), which with `min_capacity=4` is what the released EVE's
  DeepSpeed layer computes; a reproduction switch, not one for training
  (one group cannot be split over devices). `dispatch="gather"` (default)
  moves tokens into the [E, G, C, D] expert buffer and back by index, so the
  layer costs the experts' FLOPs at capacity plus the router;
  `dispatch="einsum"` uses the one-hot einsums (vmoe's form, + 2*S*E*C*D
  FLOPs per group each way). The block owns the LayerNorm in front of this
  layer and adds the residual.
  """

  def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2,
               *, num_modalities: int = 2, capacity_factor: float = 1.25,
               add_modality_to_experts: bool = True,
               normalize_gates: bool = False,
               aux_loss_weight: float = 0.001, activation: str = "gelu",
               dispatch: str = "gather", experts: str = "auto",
               group: str = "sample", route_padding: bool = False,
               min_capacity: int = 1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k: expected 1..{num_experts}, got {top_k}")
    if dispatch not in ("gather", "einsum"):
      raise ValueError(f"dispatch: expected 'gather' or 'einsum', got "
                       f"{dispatch!r}")
    self.dispatch = dispatch
    if experts not in ("auto", "batched", "unrolled"):
      raise ValueError(f"experts: expected 'auto', 'batched' or 'unrolled', "
                       f"got {experts!r}")
    self.experts = experts
    if group not in ("sample", "batch"):
      raise ValueError(f"group: expected 'sample' or 'batch', got {group!r}")
    self.group = group
    self.route_padding = route_padding
    self.min_capacity = min_capacity
    self.num_experts = num_experts
    self.top_k = top_k
    self.num_modalities = num_modalities
    self.capacity_factor = capacity_factor
    self.add_modality_to_experts = add_modality_to_experts
    self.normalize_gates = normalize_gates
    self.aux_loss_weight = aux_loss_weight
    gelu_fn(activation)  # fail early on a bad name
    self.activation = activation
    self.dtype = dtype
    e, d, f, m = num_experts, dim, hidden, num_modalities
    self.kernel = param(rngs, _KERNEL_INIT, (d, e), ("embed", None),
                        param_dtype)
    # Small normal rather than zeros: the router sees the modality from step 0.
    self.modality_embed = param(rngs, _KERNEL_INIT, (m, d), (None, "embed"),
                                param_dtype)
    self.wi = param(rngs, _KERNEL_INIT, (e, d, f), ("expert", "embed", "mlp"),
                    param_dtype)
    self.bi = param(rngs, _ZEROS, (e, f), ("expert", "mlp"), param_dtype)
    self.wo = param(rngs, _KERNEL_INIT, (e, f, d), ("expert", "mlp", "embed"),
                    param_dtype)
    self.bo = param(rngs, _ZEROS, (e, d), ("expert", "embed"), param_dtype)

  def __call__(self, x: jax.Array, modality: jax.Array,
               valid: jax.Array) -> tuple[jax.Array, MoEStats]:
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
    if self.group == "batch":  # [B, L, ...] -> [1, B * L, ...], row-major
      x, modality, valid = (a.reshape((1, -1) + a.shape[2:])
                            for a in (x, modality, valid))
    valid = valid.astype(bool)
    if self.route_padding:
      valid = jnp.ones_like(valid)
    y, stats = self._groups(x, modality, valid)
    return y.reshape(shape[:2] + y.shape[2:]), stats

  def _groups(self, x: jax.Array, modality: jax.Array, valid: jax.Array
              ) -> tuple[jax.Array, MoEStats]:
    """`__call__` on [G, S, D] groups: each routed on its own."""
    _, group_size, _ = x.shape
    with jax.named_scope("router"):
      # As a one-hot product (its gradient a small matmul, not a scatter-add
      # over every token); as fast as jnp.take on the CPU measured, and kept
      # because the measured runs in README.md used it.
      one_hot = jax.nn.one_hot(modality, self.num_modalities,
                               dtype=jnp.float32)
      b_m = jnp.einsum("GSM,MD->GSD", one_hot,
                       self.modality_embed[...].astype(jnp.float32))
      x_m = x.astype(jnp.float32) + b_m.astype(jnp.float32)
      # Eq. 6 in float32: small logit differences decide the top-k.
      logits = jnp.einsum("GSD,DE->GSE", x_m,
                          self.kernel[...].astype(jnp.float32))
      capacity = expert_capacity(group_size, self.num_experts, self.top_k,
                                 self.capacity_factor, self.min_capacity)
      d = route(logits, valid, self.top_k, capacity)
      if self.normalize_gates:
        d = normalize_gates(d)
      aux = load_balancing_loss(d.probs, d.expert_choice, valid,
                                self.aux_loss_weight)
      stats = self._stats(d, modality, valid, aux)
    with jax.named_scope("experts"):
      # The released checkpoints also feed x + b_m to the experts.
      x_in = x_m if self.add_modality_to_experts else x
      x_in = x_in.astype(self.dtype)
      if self.dispatch == "gather":
        slots, sources = slot_maps(d, self.num_experts, capacity)
        buf = jnp.swapaxes(gather_dispatch(x_in, slots, sources,
                                           self.num_experts, capacity), 0, 1)
      else:  # one-hot einsum: G*S*E*C*D multiply-adds
        buf = jnp.einsum("GSEC,GSD->EGCD", d.dispatch.astype(self.dtype),
                         x_in)
      # Dispatch where the groups are (split over act_batch = data x fsdp x
      # expert), then move the buffer to experts x act_group: resharding
      # between the two layouts is an all-to-all on `expert`. Constraining
      # only the second makes GSPMD all-gather the tokens instead.
      buf = constrain(buf, (None, "act_batch", None, "act_embed"))
      buf = constrain(buf, ("act_expert", "act_group", None, "act_embed"))
      # One [G*C, D] x [D, F] product per expert (N = G*C): with G and C
      # as separate dims XLA:CPU's backward ran 1.4x slower (measured).
      e, g, c, dim = buf.shape
      tokens = buf.reshape(e, g * c, dim)
      act = gelu_fn(self.activation)
      wi, wo = self.wi[...].astype(self.dtype), self.wo[...].astype(self.dtype)
      bi, bo = self.bi[...].astype(self.dtype), self.bo[...].astype(self.dtype)
      if self._unrolled():
        # E plain [N, D] x [D, F] products: XLA:CPU runs them ~1.3x faster
        # than the batched einsum below (measured on the small model).
        # lax.split, not x[i]: the transpose of a split is one concatenate,
        # that of E slices is E zero-padded full-size adds.
        parts = [jax.lax.split(a, [1] * e, axis=0)
                 for a in (tokens, wi, bi, wo, bo)]
        out = jnp.concatenate([
            act(t[0] @ w1[0] + b1[0]) @ w2[0] + b2[0]
            for t, w1, b1, w2, b2 in zip(*parts)])
        out = out.reshape(e, g * c, dim)
      else:
        h = jnp.einsum("END,EDF->ENF", tokens, wi)
        h = act(h + bi[:, None, :])
        h = constrain(h, ("act_expert", "act_group", "act_mlp"))
        out = jnp.einsum("ENF,EFD->END", h, wo)
        out = out + bo[:, None, :]
      out = constrain(out.reshape(e, g, c, dim),
                      ("act_expert", "act_group", None, "act_embed"))
      out = constrain(out, (None, "act_batch", None, "act_embed"))  # and back
      if self.dispatch == "gather":
        y = gather_combine(jnp.swapaxes(out, 0, 1), slots, sources, d.gates)
      else:
        y = jnp.einsum("GSEC,EGCD->GSD", d.combine.astype(self.dtype), out)
      y = constrain(y, ("act_batch", "act_seq", "act_embed"))
    return y, stats

  def _unrolled(self) -> bool:
    """Whether the experts run as E separate matmuls (see `experts`)."""
    if self.experts == "auto":
      # Only where it pays (CPU) and is harmless: with experts sharded
      # over devices, one batched einsum keeps each expert on its device.
      # The target's platform, not the host's: compiling for a TPU from a
      # CPU machine must build the TPU program.
      return (target_platform() == "cpu"
              and logical_size("act_expert") == 1)
    return self.experts == "unrolled"

  def _stats(self, d: Dispatch, modality: jax.Array, valid: jax.Array,
             aux: jax.Array) -> MoEStats:
    w = valid.astype(jnp.float32)
    routed = self.top_k * jnp.sum(w)
    dropped = routed - jnp.sum(d.kept.astype(jnp.float32))
    chosen = jax.nn.one_hot(d.expert_choice, self.num_experts,
                            dtype=jnp.float32) * w[:, :, None, None]
    mod = jax.nn.one_hot(modality, self.num_modalities, dtype=jnp.float32)
    counts = jnp.einsum("GSKE,GSM->ME", chosen, mod)
    return MoEStats(aux_loss=aux, dropped=dropped, routed=routed,
                    expert_counts=counts)


class ModalityFFN(nnx.Module):
  """Hard-router layer: one pre-LayerNorm FFN per modality, picked by id.

  No router, no capacity, nothing dropped; y = FFN_m(LN_m(x)) for each token's
  own modality m. The caller adds the residual.
  """

  def __init__(self, dim: int, hidden: int, *, num_modalities: int = 2,
               activation: str = "gelu", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_modalities = num_modalities
    gelu_fn(activation)  # fail early on a bad name
    self.activation = activation
    self.dtype = dtype
    m, d, f = num_modalities, dim, hidden
    self.norm_scale = param(rngs, _ONES, (m, d), (None, "embed"), param_dtype)
    self.norm_bias = param(rngs, _ZEROS, (m, d), (None, "embed"), param_dtype)
    self.wi = param(rngs, _KERNEL_INIT, (m, d, f), (None, "embed", "mlp"),
                    param_dtype)
    self.bi = param(rngs, _ZEROS, (m, f), (None, "mlp"), param_dtype)
    self.wo = param(rngs, _KERNEL_INIT, (m, f, d), (None, "mlp", "embed"),
                    param_dtype)
    self.bo = param(rngs, _ZEROS, (m, d), (None, "embed"), param_dtype)

  def _ffn(self, x: jax.Array, m: int) -> jax.Array:
    """FFN_m(LN_m(x)) for x [B, L, D]."""
    dt = self.dtype
    h = layer_norm(x, self.norm_scale[...][m], self.norm_bias[...][m], dt)
    h = jnp.einsum("BLD,DF->BLF", h, self.wi[...][m].astype(dt))
    h = gelu_fn(self.activation)(h + self.bi[...][m].astype(dt))
    h = jnp.einsum("BLF,FD->BLD", h, self.wo[...][m].astype(dt))
    return h + self.bo[...][m].astype(dt)

  def __call__(self, x: jax.Array, modality: jax.Array,
               counts: tuple[int, ...] | None = None) -> jax.Array:
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
          f"the sequence length {length}, got {counts}")
    # A stable sort by id puts modality m's tokens at [sum(counts[:m]), ...).
    perm = jnp.argsort(modality, axis=-1, stable=True)  # [B, L]
    xs = jnp.take_along_axis(x, perm[:, :, None], axis=1)
    pieces, start = [], 0
    for m, n in enumerate(counts):
      if n:
        pieces.append(self._ffn(xs[:, start:start + n], m))
      start += n
    ys = jnp.concatenate(pieces, axis=1)
    inverse = jnp.argsort(perm, axis=-1)
    return jnp.take_along_axis(ys, inverse[:, :, None], axis=1)
