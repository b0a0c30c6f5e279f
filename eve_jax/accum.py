"""Gradient accumulation: one optimizer step over K microbatches of a batch.

`train.grad_accum_steps=K` runs the step's forward and backward on K
microbatches of B / K rows in a `lax.scan` inside the one compiled,
donated step, sums their gradients in float32 and applies one update
(eve_jax/program.py): the memory of a batch of B / K, the recipe of a
batch of B. The data pipeline, its checkpointed state and resume see the
same batch of B.

Microbatch k holds rows k, K + k, 2K + k, ... of the batch: a device's rows
are a contiguous block of the batch, so each microbatch takes B / (K * D)
of each device's own rows and no row moves between devices (the
gradients do: with the batch split over devices XLA all-reduces each
microbatch's inside the loop, K all-reduces a step). Random draws
follow the rows (eve_jax/model/batch_random.py): a sample's masks and drop
path do not depend on K.

What is exact. Each microbatch's loss is its share of the batch's loss:
a term that is a mean over rows (MIM, VQA, NLVR2) weighs 1 / K; a term
that is a mean over something else counted per row (MLM over the masked
tokens) weighs its microbatch's count over the batch's, from the task's
`loss_weights` (counts the data decides, known before the step). With
`moe_group=sample` (a sample's routing depends on it alone) the step then
equals one batch of B to float32 rounding. Not exact, by construction:
- eq. 7's balance loss multiplies the batch's routed fraction by its mean
  router probability (router.py); accumulated, it is the mean of the
  microbatches' (as MaxText's and T5X's accumulation give). It weighs
  `aux_loss_weight` (0.001) in the loss.
- `moe_group=batch`: the MoE's group is the call's whole batch, here a
  microbatch: capacity and routing as a run at B / K.
- in-batch negatives (ITC, and ITM's hard negatives drawn from its
  similarities): refused for K > 1 (`check`), as a microbatch would see B / K
  negatives.

Logged metrics are those of the batch: the loss; each metric weighted as
its loss term is (accuracies by their counts); `dropped_token_frac` by
each microbatch's routed assignments; counts summed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from eve_jax.model import batch_random

# A metric that is a ratio over a count the model decides (after the
# fact), combined weighted by that count; the count is summed.
BY_COUNT = {"dropped_token_frac": "moe_assignments"}


def check(grad_accum_steps: int, batch_size: int, data_shards: int) -> int:
  """K, or a one-line error unless each of the `data_shards` devices'
  rows of the batch split into K microbatches."""
  k = grad_accum_steps
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"train.grad_accum_steps={k!r}: expected an integer >= 1")
  per_device = batch_size // data_shards
  if per_device % k:
    raise ValueError(
        f"train.grad_accum_steps={k} does not divide the per-device batch "
        f"{per_device} (train.batch_size={batch_size} over {data_shards} "
        "data shards)"
    )
  return k


def refuse_batch_level(grad_accum_steps: int, what: str) -> None:
  """One-line error for a task whose loss uses the whole batch at once."""
  if grad_accum_steps > 1:
    raise ValueError(
        f"train.grad_accum_steps={grad_accum_steps}: {what} uses the whole "
        "batch's negatives, which a microbatch does not see; use 1"
    )


def microbatch(x: jax.Array, index: jax.Array, count: int) -> jax.Array:
  """Rows index, count + index, 2 count + index, ... of [B, ...] x."""
  x = x.reshape((x.shape[0] // count, count) + x.shape[1:])
  return jax.lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)


def shares(weights: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """{name: [B] row weights} -> {name: [K] each microbatch's part of the
  batch's total} (1 / K each where the batch's total is 0)."""
  out = {}
  for name, w in weights.items():
    per = w.astype(jnp.float32).reshape(-1, count).sum(0)  # [K]
    total = per.sum()
    out[name] = jnp.where(total > 0, per / jnp.maximum(total, 1e-30), 1 / count)
  return out


def combine(
    metrics: dict[str, jax.Array], share: dict[str, jax.Array]
) -> dict[str, jax.Array]:
  """{name: [K] per microbatch} -> {name: the batch's value}."""
  counts = set(BY_COUNT.values())
  out = {}
  for name, v in metrics.items():
    if name in share:
      out[name] = jnp.sum(share[name] * v)
    elif name in counts:
      out[name] = jnp.sum(v)
    elif BY_COUNT.get(name) in metrics:
      w = metrics[BY_COUNT[name]]
      out[name] = jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)
    else:
      out[name] = jnp.mean(v)
  return out


def loss_and_grads(
    loss_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict]],
    params: Any,
    batch: dict[str, jax.Array],
    count: int,
    weights: dict[str, jax.Array],
):
  """jax.value_and_grad(loss_fn, has_aux=True)(params, batch), over
  `count` microbatches.

  Args:
    loss_fn: (params, batch) -> (scalar loss, {name: scalar} metrics), the
      task's loss: a sum of its metrics named *_loss plus terms that are
      means over rows.
    params: the parameters' State.
    batch: {name: [B, ...]}.
    count: K, dividing B.
    weights: {metric: [B] row weights} for the metrics that are not plain
      means over rows (`Task.loss_weights`).

  Returns:
    ((loss, metrics) of the batch, float32 gradients summed over the
    microbatches, in the parameters' dtypes).
  """
  rows = next(iter(batch.values())).shape[0] // count
  share = shares(weights, count)

  def one(grads, index):
    mb = jax.tree.map(lambda x: microbatch(x, index, count), batch)

    def weighted(p):
      with batch_random.microbatch(index, count, rows):
        loss, metrics = loss_fn(p, mb)
      # The microbatch's share of each term: 1 / K for means over rows,
      # its count over the batch's for the weighted terms.
      part = loss / count
      for name, s in share.items():
        if name.endswith("_loss") and name in metrics:
          part = part + (s[index] - 1 / count) * metrics[name]
      return part, metrics

    (loss, metrics), g = jax.value_and_grad(weighted, has_aux=True)(params)
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return grads, (loss, metrics)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, (losses, metrics) = jax.lax.scan(one, zeros, jnp.arange(count))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  # The batch's loss: the sum of the microbatches' shares.
  return (jnp.sum(losses), combine(metrics, share)), grads
