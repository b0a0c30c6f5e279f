"""grain pipelines for fine-tuning: examples in memory, images read from disk.

Training: this process's slice of the examples -> seeded shuffle (a new
order every epoch) -> repeat -> encode (read + resize the image(s),
tokenize) -> batch. A `grain.MapDataset` to the end, so the iterator state
is one integer and a resumed run sees the batches it would have seen.

Evaluation: every example once, in order, in global batches of B rows;
process p encodes rows [p * B/P, (p + 1) * B/P) of each (`sharding.
process_batch_slice`), the last batch padded with `example_valid` False
rows, so the jitted step sees one shape and every process the same number
of batches.

Images are resized whole (no crop, no flip: a flip would swap "left" and
"right" in questions and NLVR2 statements).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import grain
import numpy as np

from eve_jax import storage
from eve_jax.data import transforms
from eve_jax.data.errors import DataError

Encoder = Callable[[Any], dict[str, np.ndarray]]


def read_image(path: str, size: int) -> np.ndarray:
  """An image file -> float32 [size, size, 3] in [-1, 1]; a one-line
  DataError naming the file when it cannot be read or decoded."""
  try:
    data = storage.read_bytes(path)  # local or gs://
    return transforms.normalize_image(transforms.decode(data, size, None))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"{path}: cannot read the image "
        f"({type(e).__name__}: {str(e)[:100]})"
    ) from None


def train_batches(
    examples: Sequence[Any],
    encode: Encoder,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
):
  """An endless iterator (get_state / set_state) of this process's batches:
  dicts of [batch_size, ...] arrays from `encode`."""
  if len(examples) < process_count * batch_size:
    raise DataError(
        f"{len(examples)} training examples are fewer than one "
        f"batch ({process_count} x {batch_size})"
    )
  ds = grain.MapDataset.source(list(examples))
  ds = ds.slice(slice(process_index, None, process_count))
  ds = ds.shuffle(seed=seed).repeat().map(encode)
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(
      ds.to_iter_dataset(
          grain.ReadOptions(
              num_threads=num_threads, prefetch_buffer_size=2 * batch_size
          )
      )
  )


def eval_batches(
    examples: Sequence[Any],
    encode: Encoder,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
):
  """This process's rows of every global batch, in order (see the module
  docstring); each batch also holds `example_valid` bool [b] and `row`
  int64 [b] (the example's index, -1 for padding)."""
  b = global_batch // process_count
  n = len(examples)
  num_batches = max(-(-n // global_batch), 1)
  rows = [
      g * global_batch + process_index * b + j
      for g in range(num_batches)
      for j in range(b)
  ]
  pad = encode(examples[0])

  def one(row: int) -> dict[str, np.ndarray]:
    if row < n:
      out = dict(encode(examples[row]))
      out.update(example_valid=np.bool_(True), row=np.int64(row))
    else:
      out = {k: np.zeros_like(v) for k, v in pad.items()}
      out.update(example_valid=np.bool_(False), row=np.int64(-1))
    return out

  ds = grain.MapDataset.source(rows).map(one).batch(b)
  return iter(
      ds.to_iter_dataset(
          grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * b)
      )
  )


def resolve(directory: str, name: str) -> str:
  """`name` under `directory` unless it is absolute."""
  return name if os.path.isabs(name) else os.path.join(directory, name)
