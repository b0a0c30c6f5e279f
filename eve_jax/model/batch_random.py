"""Random draws over a batch's rows that a microbatch shares with its batch.

A training step's per-sample randomness (the MLM and MIM masks, BERT's
replacements, drop path) is drawn for a [B, ...] array from one key. With
gradient accumulation (`train.grad_accum_steps=K`, eve_jax/accum.py) the
step runs K microbatches of B / K rows; drawing [B / K, ...] from the same
key in each would give every microbatch the same bits, and none of them
those of the whole batch. Inside `microbatch(index, count, rows)`, the
draws here are made for the whole batch and the microbatch's rows taken
from them, so a sample gets the same masks and drop path whichever K it
is trained with (and a run at K = 1 draws exactly what it always has).

Microbatch k holds the batch's rows k, K + k, 2K + k, ... (accum.py): each
device's rows of the batch stay on that device. A draw over m rows per
example (NLVR2's paired pass: an example's rows side by side) takes the
example's m rows.

The whole batch is drawn in each microbatch: K times the draws of one
step, a few [B, L] integers against the model's work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class _Window:
  index: jax.Array  # int32 scalar, traced: which microbatch
  count: int  # K
  rows: int  # examples per microbatch (B / K)


_active: list[_Window] = []


@contextlib.contextmanager
def microbatch(index: jax.Array, count: int, rows: int) -> Iterator[None]:
  """Draws traced inside take microbatch `index` of `count`, each of
  `rows` examples, from the draw of the whole batch."""
  _active.append(_Window(jnp.asarray(index, jnp.int32), int(count), rows))
  try:
    yield
  finally:
    _active.pop()


def _rows(draw: Callable[[tuple[int, ...]], jax.Array], shape) -> jax.Array:
  """draw(shape) for the whole batch, or the active microbatch's rows of
  draw(the whole batch's shape)."""
  shape = tuple(shape)
  if not _active:
    return draw(shape)
  w = _active[-1]
  if shape[0] % w.rows:
    raise ValueError(
        f"a random draw over {shape[0]} rows in a microbatch of {w.rows} "
        "examples: expected a whole number of rows per example"
    )
  per = shape[0] // w.rows
  full = draw((w.rows * w.count * per,) + shape[1:])
  full = full.reshape((w.rows, w.count, per) + shape[1:])
  mine = jax.lax.dynamic_index_in_dim(full, w.index, axis=1, keepdims=False)
  return mine.reshape(shape)


def uniform(rng: jax.Array, shape) -> jax.Array:
  """float32 U[0, 1) of `shape` ([B, ...]), as jax.random.uniform."""
  return _rows(lambda s: jax.random.uniform(rng, s), shape)


def bernoulli(rng: jax.Array, p, shape) -> jax.Array:
  """bool of `shape` ([B, ...]), True with probability p."""
  return _rows(lambda s: jax.random.bernoulli(rng, p, s), shape)


def randint(rng: jax.Array, shape, minval: int, maxval: int) -> jax.Array:
  """int32 of `shape` ([B, ...]) in [minval, maxval)."""
  return _rows(lambda s: jax.random.randint(rng, s, minval, maxval), shape)
