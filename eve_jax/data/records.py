"""Prepared image-text corpora on disk: tfds ArrayRecord datasets, no TensorFlow.

`python -m eve_jax.data.prepare SOURCE --out DIR` writes one corpus per
directory; `tfds.builder_from_directory(DIR)` opens it, and so does
`open_split` below (a random-access source for grain):

  DIR/dataset_info.json, DIR/features.json        tfds metadata
  DIR/{name}-{split}.array_record-0000k-of-0000n   the records
  DIR/{split}_pairs.npy   int64 [records + 1]: cumulative caption counts
  DIR/summary.json        what `prepare` wrote and skipped, and why

One record is one image with all of its captions:

  image     bytes, the encoded file (JPEG or PNG as found, else re-encoded
            as JPEG)
  captions  list of str (non-empty, stripped)
  image_id  str, the source's own id (file name or annotation id)
  source    str, the corpus name ("coco", "vg", "cc3m", ...)

Training walks image-text *pairs* (the paper counts 10M pairs over 4M
images): pair p is caption p - pairs[r] of record r, found by a binary
search in `{split}_pairs.npy` so no record is read to build the index.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

FORMAT_VERSION = "1.0.0"
SUMMARY = "summary.json"


def _features():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.features.FeaturesDict(
      {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "captions": tfds.features.Sequence(tfds.features.Text()),
          "image_id": tfds.features.Text(),
          "source": tfds.features.Text(),
      }
  )


def _shard_name(name: str, split: str, k: int, n: int) -> str:
  return f"{name}-{split}.array_record-{k:05d}-of-{n:05d}"


class CorpusWriter:
  """Writes records of one or more splits into DIR, then the metadata.

  Use as a context manager, or call `close(summary)`; nothing under DIR is a
  valid dataset until `close` has written dataset_info.json (last, so a
  killed `prepare` leaves no half corpus that looks complete).
  """

  def __init__(self, out_dir: str, name: str, *, records_per_shard: int = 4096):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

    self._ar = array_record_module
    self.out_dir = os.path.abspath(out_dir)
    self.name = name
    self.records_per_shard = records_per_shard
    os.makedirs(self.out_dir, exist_ok=True)
    if os.path.exists(os.path.join(self.out_dir, "dataset_info.json")):
      raise FileExistsError(
          f"{self.out_dir} already holds a prepared corpus; "
          "choose another --out or delete it first"
      )
    self._features = _features()
    self._serializer = example_serializer.ExampleSerializer(
        self._features.get_serialized_info()
    )
    self._splits: dict[str, dict[str, Any]] = {}
    self._closed: dict[str, Any] | None = None

  def add(
      self,
      image: bytes,
      captions: Sequence[str],
      image_id: str,
      source: str,
      split: str = "train",
  ) -> None:
    """Appends one record; `captions` must be non-empty, already cleaned."""
    if not captions:
      raise ValueError(f"image {image_id!r} has no captions")
    s = self._splits.setdefault(
        split, dict(shards=[], lengths=[], bytes=0, pairs=[0], writer=None)
    )
    if s["writer"] is None or s["lengths"][-1] == self.records_per_shard:
      self._close_shard(s)
      path = os.path.join(
          self.out_dir, f".{self.name}-{split}.part{len(s['shards']):05d}"
      )
      s["writer"] = self._ar.ArrayRecordWriter(path, "group_size:1")
      s["shards"].append(path)
      s["lengths"].append(0)
    blob = self._serializer.serialize_example(
        self._features.encode_example(
            dict(
                image=image,
                captions=list(captions),
                image_id=str(image_id),
                source=source,
            )
        )
    )
    s["writer"].write(blob)
    s["lengths"][-1] += 1
    s["bytes"] += len(blob)
    s["pairs"].append(s["pairs"][-1] + len(captions))

  @staticmethod
  def _close_shard(s: dict[str, Any]) -> None:
    if s["writer"] is not None:
      s["writer"].close()
      s["writer"] = None

  def close(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Names the shards, writes the pair index, summary and tfds metadata.

    Returns:
      {split: {"records": n, "pairs": m}}.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if self._closed is not None:  # closed already (e.g. close() in a `with`)
      return self._closed
    counts, split_infos = {}, []
    for split, s in self._splits.items():
      self._close_shard(s)
      n = len(s["shards"])
      for k, part in enumerate(s["shards"]):
        os.replace(
            part,
            os.path.join(self.out_dir, _shard_name(self.name, split, k, n)),
        )
      np.save(
          os.path.join(self.out_dir, f"{split}_pairs.npy"),
          np.asarray(s["pairs"], np.int64),
      )
      split_infos.append(
          tfds.core.SplitInfo(
              name=split, shard_lengths=list(s["lengths"]), num_bytes=s["bytes"]
          )
      )
      counts[split] = dict(
          records=int(sum(s["lengths"])), pairs=int(s["pairs"][-1])
      )
    with open(os.path.join(self.out_dir, SUMMARY), "w") as f:
      json.dump(
          dict(summary or {}, name=self.name, splits=counts),
          f,
          indent=1,
          sort_keys=True,
      )
    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(
            name=self.name,
            version=FORMAT_VERSION,
            data_dir=self.out_dir,
            module_name="eve_jax.data.records",
        ),
        description=f"{self.name} image-text pairs prepared by eve_jax",
        features=self._features,
        split_dict=tfds.core.SplitDict(split_infos),
    )
    info.set_file_format("array_record")
    info.write_to_directory(self.out_dir)
    self._closed = counts
    return counts

  def __enter__(self) -> "CorpusWriter":
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:  # leave no dataset_info.json behind: the corpus is not complete
      for s in self._splits.values():
        self._close_shard(s)


def is_corpus(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json"))


class CorpusSplit:
  """Random access to one split's records, decoded to Python values.

  `split[r]` = {"image": bytes, "captions": [str], "image_id": str,
  "source": str}; `split.pairs` the int64 cumulative caption counts.
  Picklable (grain may copy it into worker processes): reopens lazily.
  """

  def __init__(self, directory: str, split: str = "train"):
    self.directory = os.path.abspath(directory)
    self.split = split
    if not is_corpus(self.directory):
      raise FileNotFoundError(
          f"{self.directory} is not a prepared corpus (no " "dataset_info.json)"
      )
    pairs_path = os.path.join(self.directory, f"{split}_pairs.npy")
    if not os.path.isfile(pairs_path):
      raise FileNotFoundError(
          f"{self.directory} has no split {split!r} "
          f"({os.path.basename(pairs_path)} missing)"
      )
    self.pairs = np.load(pairs_path)
    self._source = None
    self._open()  # fail now, in one line, if shards are missing or short

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if self._source is None:
      try:
        builder = tfds.builder_from_directory(self.directory)
        info = builder.info.splits[self.split]
        _check_shards(info.filepaths, info.shard_lengths)
        self._source = builder.as_data_source(split=self.split)
      except Exception as e:  # tfds raises many kinds; name the corpus
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise OSError(
            f"cannot open {self.directory} split {self.split!r}: "
            f"{first[:200]}"
        ) from None
      if len(self._source) != len(self.pairs) - 1:
        raise OSError(
            f"{self.directory}: {len(self._source)} records in the "
            f"shards but {len(self.pairs) - 1} in "
            f"{self.split}_pairs.npy"
        )
    return self._source

  def __len__(self) -> int:
    return len(self.pairs) - 1

  @property
  def num_pairs(self) -> int:
    return int(self.pairs[-1])

  def pair(self, p: int) -> tuple[int, int]:
    """Pair index -> (record index, caption index within it)."""
    r = int(np.searchsorted(self.pairs, p, side="right")) - 1
    return r, int(p - self.pairs[r])

  def __getitem__(self, r: int) -> dict[str, Any]:
    ex = self._open()[int(r)]
    return dict(
        image=bytes(ex["image"]),
        captions=[_text(c) for c in ex["captions"]],
        image_id=_text(ex["image_id"]),
        source=_text(ex["source"]),
    )

  def __getstate__(self):
    return dict(self.__dict__, _source=None)

  def __repr__(self) -> str:
    return f"CorpusSplit({self.directory!r}, {self.split!r})"


def _check_shards(paths, lengths) -> None:
  """Every shard present with its record count (reads only the footers),
  so a lost or cut file is named when the run starts, not hours in."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  for path, n in zip(paths, lengths):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"shard {os.path.basename(path)} is missing")
    try:
      reader = array_record_module.ArrayRecordReader(path)
      found = reader.num_records()
      reader.close()
    except Exception:  # pylint: disable=broad-except
      # array_record's errors on a cut file carry no message of their own.
      raise ValueError(
          f"shard {os.path.basename(path)} cannot be read "
          "(truncated or corrupt)"
      ) from None
    if found != n:
      raise ValueError(
          f"shard {os.path.basename(path)} has {found} records, "
          f"dataset_info.json says {n}"
      )


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_summary(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, SUMMARY)) as f:
    return json.load(f)


def all_pairs(
    directory: str, split: str = "train"
) -> Iterable[tuple[str, str]]:
  """Every (image_id, caption) of a split, in record order (tests, tools)."""
  corpus = CorpusSplit(directory, split)
  for r in range(len(corpus)):
    ex = corpus[r]
    for c in ex["captions"]:
      yield ex["image_id"], c
