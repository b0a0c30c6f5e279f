"""grain input pipeline for EVE-Shapes: records -> shard -> shuffle -> batches.

The whole pipeline is a `grain.MapDataset` (random access) until the final
`to_iter_dataset`, so an iterator's state is just the next batch position
(`{"next_index": k}`, JSON-serializable) and restoring it is O(1): batch k
is recomputed from (seed, split, k) alone.

No augmentation: a horizontal flip would turn "left of" into a lie, and the
captions name absolute colors and sizes, so color jitter and random crops
would do the same.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from eve_jax.data import shapes
from eve_jax.data.transforms import normalize_image
from eve_jax.data.tokenizer import Tokenizer

SPLITS = ("train", "eval")
# Virtual length of the train split: "infinite" for any run, while grain's
# shuffle stays a permutation over a finite range.
TRAIN_LENGTH = 2**30


def split_seed(seed: int, split: str) -> int:
  """Generator stream of `split`: train and eval never share a stream.

  Even / odd stream seeds keep the splits apart for every user seed, so
  (train, seed=s) can never equal (eval, seed=t).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return 2 * seed + SPLITS.index(split)


class ShapesSource:
  """Random-access EVE-Shapes records of one split.

  `source[i]` is a dict: image uint8 [H, W, 3], caption str, index int
  (i itself, the record's id within the split).
  """

  def __init__(self, *, split: str, seed: int, image_size: int, length: int):
    self.split = split
    self.stream_seed = split_seed(seed, split)
    self.image_size = image_size
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f"record {index} out of range [0, {self._length})")
    example = shapes.generate(self.stream_seed, int(index), self.image_size)
    return {
        "image": example.image,
        "caption": example.caption,
        "index": int(index),
    }

  def __repr__(self) -> str:
    return (
        f"ShapesSource(split={self.split!r}, stream_seed={self.stream_seed}, "
        f"image_size={self.image_size}, length={self._length})"
    )


class _Preprocess(grain.transforms.Map):
  """Record -> model inputs: normalized image, [CLS]-first token ids."""

  def __init__(self, tokenizer: Tokenizer, max_text_len: int):
    self._tokenizer = tokenizer
    self._max_text_len = max_text_len

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    ids, valid = self._tokenizer.encode_batch(
        [record["caption"]], self._max_text_len
    )
    return {
        "image": normalize_image(record["image"]),
        "text": ids[0],
        "text_valid": valid[0],
        "index": np.int64(record["index"]),
    }


def make_shapes_dataset(
    *,
    split: str,
    seed: int,
    batch_size: int,
    image_size: int,
    tokenizer: Tokenizer,
    max_text_len: int,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
  """EVE-Shapes batches for this process.

  Use `it = iter(ds)`; `it.get_state()` is a small JSON-serializable dict,
  and `fresh_it.set_state(state)` on a new iterator of an identically
  built dataset continues with exactly the same batches.

  Args:
    split: "train" or "eval" (disjoint generator streams).
    seed: data seed; also seeds the shuffle (reshuffled every epoch).
    batch_size: per-process batch size.
    image_size: H = W.
    tokenizer: text tokenizer; `max_text_len` includes the [CLS] token.
    max_text_len: token sequence length L (longer captions are truncated).
    process_index, process_count: this process takes records
      process_index::process_count, a disjoint cover of the split.
    num_examples: records in the split; required for "eval", defaults to
      TRAIN_LENGTH for "train".
    shuffle, repeat, drop_remainder: for eval use False, False, False to
      see each of the num_examples records exactly once (summed over
      processes; the last batch may be smaller and shards may differ by one
      record when process_count does not divide num_examples).
    num_threads, prefetch_batches: grain read threads and prefetched
      batches (bounded, since a 224 px batch of 256 is ~150 MB).

  Returns:
    A grain.IterDataset of dicts: image float32 [b, H, W, 3] in [-1, 1],
    text int32 [b, L], text_valid bool [b, L], index int64 [b].
  """
  if num_examples is None:
    if split == "eval":
      raise ValueError("split='eval' needs num_examples")
    num_examples = TRAIN_LENGTH
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, {process_count})"
    )
  source = ShapesSource(
      split=split, seed=seed, image_size=image_size, length=num_examples
  )
  ds = grain.MapDataset.source(source)
  # Shard before shuffling: each process permutes only its own records, so
  # shards stay disjoint whatever the shuffle seed.
  ds = ds.slice(slice(process_index, None, process_count))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_Preprocess(tokenizer, max_text_len))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=num_threads, prefetch_buffer_size=prefetch_batches
      )
  )
