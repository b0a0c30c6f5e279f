"""grain pipeline over prepared image-text corpora (`eve_jax.data.prepare`).

  pairs of corpus c (0 .. pairs_c - 1)
    -> this process's slice (p_index::p_count), before any shuffle, so
       shards are disjoint whatever the seed
    -> seeded shuffle (a new order every epoch), repeated for training
    -> weighted mix of the corpora (default weights: their pair counts,
       i.e. the union the paper trains on)
    -> decode + random resized crop + flip (seeded per element), tokenize
    -> drop the images that do not decode (counted), batch

Everything up to the drop is a `grain.MapDataset`, so the iterator state is
one integer (the next element) plus the skip count, and a restored iterator
yields bitwise the batches the uninterrupted one would have.

Legend: b per-process batch, S image size, L text length.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np

from eve_jax.data import records, transforms
from eve_jax.data.errors import DataError, not_in_a_bucket
from eve_jax.data.tokenizer import Tokenizer

PREPARE = "python -m eve_jax.data.prepare"
# What `prepare` needs per corpus, for the error that says how to make one.
_PREPARE_HINT = {
    "coco": "coco --captions captions_train2017.json --images train2017 "
    "--exclude_karpathy_test dataset_coco.json",
    "vg": "vg --regions region_descriptions.json --images VG_100K VG_100K_2",
    "sbu": "webdataset --name sbu --shards 'sbu/*.tar'",
    "cc3m": "webdataset --name cc3m --shards 'cc3m/*.tar'",
    "cc12m": "webdataset --name cc12m --shards 'cc12m/*.tar'",
}


@dataclasses.dataclass(frozen=True)
class Corpus:
  name: str
  directory: str
  weight: float | None  # None: proportional to its pairs


def parse_mixture(root: str, mixture: str) -> list[Corpus]:
  """`data.dir` + `data.mixture` -> the corpora to read.

  Args:
    root: a directory of prepared corpora (one per subdirectory), or one
      prepared corpus itself.
    mixture: "coco,vg,sbu,cc3m" or with weights "coco:2,vg:1"; empty: every
      corpus under `root` (or `root` itself), weighted by pair counts.

  Raises:
    DataError naming the missing directory and the command that makes it.
  """
  if not root:
    raise DataError(
        "config.data.dir is empty: set --config.data.dir to a "
        f"directory of corpora prepared with `{PREPARE}` (or "
        "train on EVE-Shapes: --config=configs/base.py:tiny)"
    )
  if root.startswith("gs://"):
    # grain's ArrayRecord source takes local files only; given gs:// it
    # hangs instead of failing.
    raise not_in_a_bucket(
        "config.data.dir",
        root,
        "prepared corpora are ArrayRecord files, which grain reads from "
        "local paths only",
    )
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DataError(
        f"config.data.dir={root} does not exist; prepare the "
        f"corpora into it with `{PREPARE} SOURCE --out "
        f"{root}/NAME ...`"
    )
  if not mixture:
    if records.is_corpus(root):
      return [Corpus(os.path.basename(root), root, None)]
    names = sorted(
        n for n in os.listdir(root) if records.is_corpus(os.path.join(root, n))
    )
    if not names:
      raise DataError(
          f"{root} holds no prepared corpus (no */dataset_info."
          f"json); make one with `{PREPARE} SOURCE --out "
          f"{root}/NAME ...`"
      )
    return [Corpus(n, os.path.join(root, n), None) for n in names]
  out = []
  for part in filter(None, (p.strip() for p in mixture.split(","))):
    name, _, weight = part.partition(":")
    try:
      w = float(weight) if weight else None
    except ValueError:
      raise DataError(
          f"config.data.mixture: weight {weight!r} of {name!r} "
          "is not a number"
      ) from None
    if w is not None and w <= 0:
      raise DataError(f"config.data.mixture: weight of {name!r} must be > 0")
    directory = os.path.join(root, name)
    if not records.is_corpus(directory):
      hint = _PREPARE_HINT.get(name, "SOURCE ...")
      raise DataError(
          f"no prepared corpus {name!r} at {directory}; make it "
          f"with `{PREPARE} {hint} --out {directory}`"
      )
    out.append(Corpus(name, directory, w))
  if not out:
    raise DataError(f"config.data.mixture={mixture!r} names no corpus")
  if len({c.weight is None for c in out}) > 1:
    raise DataError(
        "config.data.mixture: give a weight to every corpus or " "to none"
    )
  return out


def open_splits(
    corpora: Sequence[Corpus], split: str
) -> list[records.CorpusSplit]:
  """The corpora's `split`, with one-line errors for unreadable shards."""
  out = []
  for c in corpora:
    try:
      out.append(records.CorpusSplit(c.directory, split))
    except (OSError, ValueError) as e:
      raise DataError(str(e).splitlines()[0]) from None
  return out


class SkipCounter:
  """Images that failed to decode, counted where batches are consumed."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def keep(self, element: dict[str, Any]) -> bool:
    if element.get("bad"):
      with self._lock:
        self.count += 1
      return False
    return True


class _Example(grain.transforms.RandomMap):
  """(corpus, pair) -> image [S, S, 3] float32, text [L], text_valid [L]."""

  def __init__(
      self,
      splits,
      tokenizer: Tokenizer,
      image_size: int,
      max_text_len: int,
      augment: bool,
  ):
    self._splits = splits
    self._tokenizer = tokenizer
    self._size = image_size
    self._max_text_len = max_text_len
    self._augment = augment

  def random_map(self, element, rng: np.random.Generator):
    c, p = element
    split = self._splits[c]
    r, k = split.pair(p)
    ex = split[r]
    try:
      image = transforms.decode(
          ex["image"], self._size, rng if self._augment else None
      )
    except Exception:  # pylint: disable=broad-except
      # Any undecodable image (truncated, wrong format, bomb) is dropped and
      # counted downstream; training never stops for one bad file.
      return {"bad": True}
    ids, valid = self._tokenizer.encode_batch(
        [ex["captions"][k]], self._max_text_len
    )
    return {
        "image": transforms.normalize_image(image),
        "text": ids[0],
        "text_valid": valid[0],
        "corpus": np.int32(c),
        "index": np.int64(p),
    }


def _pairs(
    split: records.CorpusSplit,
    c: int,
    process_index: int,
    process_count: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.MapDataset:
  ds = grain.MapDataset.range(split.num_pairs)
  ds = ds.slice(slice(process_index, None, process_count))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  return ds.map(lambda p, c=c: (c, p))


class CorpusIterator:
  """Batches of a corpora dataset with the skip count in its state."""

  def __init__(self, dataset: grain.IterDataset, counter: SkipCounter):
    self._it = iter(dataset)
    self.counter = counter

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  @property
  def skipped(self) -> int:
    return self.counter.count

  def get_state(self) -> dict[str, Any]:
    return {
        "iterator": self._it.get_state(),
        "skipped_images": self.counter.count,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if "iterator" not in state:
      raise DataError(
          "the checkpoint's data state is not a corpora "
          "iterator's (was this workdir trained on EVE-Shapes?)"
      )
    self._it.set_state(state["iterator"])
    self.counter.count = int(state["skipped_images"])


def make_dataset(
    corpora: Sequence[Corpus],
    *,
    split: str,
    seed: int,
    batch_size: int,
    image_size: int,
    tokenizer: Tokenizer,
    max_text_len: int,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
    num_examples: int | None = None,
    num_threads: int = 8,
    prefetch_batches: int = 2,
) -> CorpusIterator:
  """This process's batches of the corpora mixture.

  Args:
    corpora: from `parse_mixture`.
    split: "train" or "eval" (what `prepare --eval_images` held out).
    seed: shuffles (a new order every epoch) and augmentation.
    batch_size: rows per batch in this process.
    train: shuffle, repeat forever, augment; False: one pass in order, no
      augmentation, first `num_examples` pairs of the mixture (eval).
    num_threads, prefetch_batches: grain read threads and prefetch depth
      (Pillow releases the GIL while decoding, so threads scale).

  Returns:
    A `CorpusIterator` of dicts: image float32 [b, S, S, 3] in [-1, 1],
    text int32 [b, L], text_valid bool [b, L], corpus int32 [b], index
    int64 [b] (the pair within its corpus). In eval mode the last batch may
    be smaller.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in " f"[0, {process_count})"
    )
  splits = open_splits(corpora, split)
  parts = [
      _pairs(
          s,
          c,
          process_index,
          process_count,
          seed + 7919 * c,
          shuffle=train,
          repeat=train,
      )
      for c, s in enumerate(splits)
  ]
  if train:
    weights = [
        c.weight if c.weight is not None else s.num_pairs
        for c, s in zip(corpora, splits)
    ]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  else:  # evaluation: corpus after corpus, in order
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    if num_examples is not None:
      # Pairs num_examples.. of the whole (unsliced) set are left out:
      # the slice above already took every process_count-th one.
      per_process = -(-(num_examples - process_index) // process_count)
      ds = ds[: max(per_process, 0)]
  counter = SkipCounter()
  ds = ds.random_map(
      _Example(splits, tokenizer, image_size, max_text_len, augment=train),
      seed=seed,
  )
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=num_threads,
          prefetch_buffer_size=max(prefetch_batches, 1) * batch_size,
      )
  )
  it = it.filter(counter.keep).batch(batch_size, drop_remainder=train)
  return CorpusIterator(it, counter)
