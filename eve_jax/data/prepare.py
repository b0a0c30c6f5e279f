"""`python -m eve_jax.data.prepare`: image-text corpora -> prepared corpora.

Converts the usual distribution formats of image-text corpora into the
prepared-corpus format of `eve_jax.data.records` (tfds ArrayRecord datasets,
readable without TensorFlow), one corpus per --out directory:

  coco        COCO captions files (captions_train2017.json, ...: `images:
              [{id, file_name}]`, `annotations: [{image_id, caption}]`) and
              the image folders. --exclude_karpathy_test dataset_coco.json
              (Karpathy's split: `images: [{cocoid, split}]`) drops the
              Karpathy val and test images, so that evaluation on them stays
              clean.
  vg          Visual Genome region_descriptions.json (`[{id, regions:
              [{phrase}]}]`) and the VG_100K, VG_100K_2 folders of
              `{id}.jpg`; every region phrase is a caption of its image.
  webdataset  img2dataset tar shards (CC3M, CC12M, SBU): members KEY.jpg
              (.jpeg, .png, .webp) with KEY.txt and/or KEY.json
              {"caption": ...}; --shards takes files or glob patterns.
  tsv         rows `image<TAB>caption` (optional header `image<TAB>caption`),
              or a .parquet file with columns image, caption (needs
              pyarrow); image is a local path, relative ones are resolved
              against --images or the file's folder.
  tokenizer   not a corpus: trains the SentencePiece model on the train
              captions of prepared corpora (`tokenizer --out spm.model DIR..`).

Every image is decoded in full with Pillow before it is written; missing,
unreadable and undecodable images, empty captions and images left without a
caption are skipped and counted by reason in DIR/summary.json. JPEG and PNG
files are stored byte for byte; other formats are re-encoded as JPEG. Output
is a pure function of the inputs (images in id / file / tar-member order), and
images stream through a bounded read-ahead window, so a corpus of any size
takes little memory beyond its caption tables (COCO, VG, TSV).
--eval_images N puts the N accepted images with the smallest hash of their id
in split "eval" (held out for the training's evaluation; they wait on disk,
not in memory, until the end).

A malformed input stops the run with one line, `eve_jax: error: FILE: what`,
exit status 1, and no dataset_info.json (nothing that looks like a corpus).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import heapq
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from eve_jax.data import records
from eve_jax.data.errors import DataError

PROG = "python -m eve_jax.data.prepare"

# Skip reasons: the keys of summary["skipped"].
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
UNDECODABLE_IMAGE = "undecodable image"
OVERSIZED_IMAGE = "oversized image"
EMPTY_CAPTION = "empty caption"  # counts captions, all others count images
NO_CAPTION = "image without caption"
UNDECODABLE_CAPTION = "undecodable caption"
NO_IMAGE = "sample without image"

STORED_FORMATS = ("JPEG", "PNG")
JPEG_QUALITY = 95
# Image members of a webdataset sample, in order of preference.
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOG_EVERY = 5000
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass
class Item:
  """One image of a source, before validation.

  Attributes:
    image_id: the source's own id of the image.
    captions: its raw captions (cleaned by `convert`).
    path: the image file; None with `data` None: the image was not found.
    data: the encoded image when the source holds it (a tar member).
    skip: a reason to drop the image decided by the source (Karpathy split),
      or None.
  """
  image_id: str
  captions: Sequence[str] = ()
  path: str | None = None
  data: bytes | None = None
  skip: str | None = None


class Loaded(NamedTuple):
  """What `load_image` made of one image: bytes to store, or a skip reason."""
  data: bytes | None
  reason: str | None
  reencoded: bool


def clean_caption(text: str) -> str:
  """Strips and collapses each run of whitespace (tabs, newlines) to a space."""
  return " ".join(text.split())


def load_image(path: str | None, data: bytes | None) -> Loaded:
  """Reads and fully decodes one image (thread-safe; Pillow drops the GIL).

  Args:
    path: the image file, read when `data` is None.
    data: the encoded image.

  Returns:
    Loaded(bytes to store, None, reencoded) for a valid image: the bytes as
    found for JPEG and PNG, a quality-95 RGB JPEG otherwise; or
    Loaded(None, skip reason, False).
  """
  if data is None:
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return Loaded(None, MISSING_IMAGE, False)
    except OSError:  # a folder with an image's name, no permission, EIO
      return Loaded(None, UNREADABLE_IMAGE, False)
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt = im.format
      # convert() decodes every pixel, so truncated data raises here, and it
      # proves the mode converts to RGB, as the training's decoder will.
      rgb = im.convert("RGB")
  except Image.DecompressionBombError:
    return Loaded(None, OVERSIZED_IMAGE, False)
  except Exception:  # pylint: disable=broad-except
    # Bad bytes make Pillow raise OSError, SyntaxError, ValueError,
    # struct.error, EOFError, ... depending on the format: all mean the same.
    return Loaded(None, UNDECODABLE_IMAGE, False)
  if fmt in STORED_FORMATS:
    return Loaded(data, None, False)
  out = io.BytesIO()
  rgb.save(out, "JPEG", quality=JPEG_QUALITY)
  return Loaded(out.getvalue(), None, True)


def eval_key(image_id: str) -> int:
  """The hash that picks the --eval_images held-out set (smallest first)."""
  return int.from_bytes(
      hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "big")


def default_workers() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return max(1, min(8, cpus))


# ----------------------------------------------------------------------------
# Conversion: items -> validated images -> records.


def _validated(items: Iterable[Item], workers: int
               ) -> Iterator[tuple[Item, list[str], int, Loaded | None]]:
  """Validates `items` in `workers` threads, yielding results in input order.

  Yields:
    (item, its non-empty cleaned captions, number of empty captions, the
    loaded image or None when the image was not looked at).
  """
  # At most `depth` images are read ahead: memory stays bounded for any
  # corpus size (tar members hold their bytes until their turn).
  depth = 4 * workers
  pending: collections.deque = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(workers,
                                               thread_name_prefix="prepare")
  try:
    for item in items:
      captions = [clean_caption(c) for c in item.captions]
      kept = [c for c in captions if c]
      future = None
      if (item.skip is None and kept and
          (item.path is not None or item.data is not None)):
        future = pool.submit(load_image, item.path, item.data)
        item.data = None  # the future holds it now
      pending.append((item, kept, len(captions) - len(kept), future))
      if len(pending) > depth:
        yield _resolved(pending.popleft())
    while pending:
      yield _resolved(pending.popleft())
  finally:
    # A stop (--limit, an error) abandons what was read ahead.
    pool.shutdown(wait=True, cancel_futures=True)


def _resolved(entry):
  item, kept, empty, future = entry
  return item, kept, empty, None if future is None else future.result()


class _Sink:
  """Sends accepted images to split "train", or holds them out for "eval".

  The eval split is the `eval_images` accepted images with the smallest
  `eval_key(image_id)`, so it does not depend on the input order. Candidates
  wait in a max-heap, their bytes spilled to `spill_dir`, and one pushed out
  by a smaller key goes to "train" at that moment.
  """

  def __init__(self, writer: records.CorpusWriter, source: str,
               eval_images: int, spill_dir: str):
    self.writer, self.source = writer, source
    self.eval_images, self.spill_dir = eval_images, spill_dir
    self._heap: list[tuple[int, int, int, list[str], str]] = []
    self._seq = 0
    self.images = self.pairs = 0

  def add(self, data: bytes, captions: list[str], image_id: str) -> None:
    self.images += 1
    self.pairs += len(captions)
    seq, self._seq = self._seq, self._seq + 1
    if not self.eval_images:
      self.writer.add(data, captions, image_id, self.source, "train")
      return
    key = eval_key(image_id)
    if len(self._heap) == self.eval_images:
      top_key, top_seq = -self._heap[0][0], -self._heap[0][1]
      if (key, seq) > (top_key, top_seq):
        self.writer.add(data, captions, image_id, self.source, "train")
        return
      _, _, old_seq, old_captions, old_id = heapq.heappop(self._heap)
      self.writer.add(self._unspill(old_seq), old_captions, old_id,
                      self.source, "train")
    with open(os.path.join(self.spill_dir, str(seq)), "wb") as f:
      f.write(data)
    heapq.heappush(self._heap, (-key, -seq, seq, captions, image_id))

  def _unspill(self, seq: int) -> bytes:
    path = os.path.join(self.spill_dir, str(seq))
    with open(path, "rb") as f:
      data = f.read()
    os.remove(path)
    return data

  @property
  def held_out(self) -> int:
    return len(self._heap)

  def finish(self) -> None:
    """Writes the held-out images to "eval", in input order."""
    for _, _, seq, captions, image_id in sorted(self._heap,
                                                key=lambda e: e[2]):
      self.writer.add(self._unspill(seq), captions, image_id, self.source,
                      "eval")
    self._heap = []


def convert(items: Iterable[Item], out_dir: str, name: str, *,
            inputs: Sequence[str], records_per_shard: int = 2048,
            eval_images: int = 0, workers: int | None = None,
            limit: int | None = None, log: Any = sys.stderr
            ) -> dict[str, Any]:
  """Validates `items` and writes them as the prepared corpus `out_dir`.

  Args:
    items: the images of a source, in output order.
    out_dir: the corpus directory (created; must not hold a corpus).
    name: the corpus name, also every record's `source`.
    inputs: the input files and folders, recorded in the summary; the first
      one is named by the error when no image is usable.
    records_per_shard: records per ArrayRecord shard file.
    eval_images: images held out in split "eval" (by `eval_key`).
    workers: threads that read and decode images.
    limit: stop after this many accepted images.
    log: where progress lines go.

  Returns:
    The summary written to out_dir/summary.json: source, inputs, images,
    pairs, eval_images, reencoded_as_jpeg, skipped {reason: count}, splits.

  Raises:
    DataError: from the source's items, or when no image is usable.
  """
  workers = workers or default_workers()
  created = not os.path.exists(out_dir)
  writer = records.CorpusWriter(out_dir, name,
                                records_per_shard=records_per_shard)
  try:
    with tempfile.TemporaryDirectory(dir=writer.out_dir,
                                     prefix=".eval-spill-") as spill:
      sink = _Sink(writer, name, eval_images, spill)
      skipped: collections.Counter = collections.Counter()
      reencoded = seen = 0
      start = time.monotonic()
      # closing(): a --limit stop ends the read-ahead threads right here.
      with contextlib.closing(_validated(items, workers)) as results:
        for item, captions, empty, loaded in results:
          seen += 1
          if empty:
            skipped[EMPTY_CAPTION] += empty
          if item.skip is not None:
            skipped[item.skip] += 1
          elif not captions:
            skipped[NO_CAPTION] += 1
          elif loaded is None:
            skipped[MISSING_IMAGE] += 1
          elif loaded.reason is not None:
            skipped[loaded.reason] += 1
          else:
            sink.add(loaded.data, captions, item.image_id)
            reencoded += loaded.reencoded
          if seen % LOG_EVERY == 0:
            rate = seen / max(time.monotonic() - start, 1e-9)
            print(f"prepare {name}: {seen:,} images read, {sink.images:,} "
                  f"kept ({rate:,.0f} images/s)", file=log, flush=True)
          if limit is not None and sink.images >= limit:
            break
      if sink.images <= eval_images:
        what = (f"no usable image ({_skip_text(skipped)})" if not sink.images
                else f"only {sink.images:,} usable images, --eval_images "
                f"{eval_images:,} would leave none for training")
        raise DataError.at(inputs[0] if inputs else out_dir, what)
      held_out = sink.held_out
      sink.finish()
    summary = dict(
        source=name, inputs=list(inputs), images=sink.images,
        pairs=sink.pairs, eval_images=held_out, reencoded_as_jpeg=reencoded,
        skipped=dict(sorted(skipped.items())), limit=limit)
    summary["splits"] = writer.close(summary)
    return summary
  except BaseException:
    # The writer's own error path: close the open shard files, write no
    # metadata. Then drop the unnamed shards so a rerun starts clean.
    writer.__exit__(*sys.exc_info())
    _remove_parts(writer.out_dir, name, created)
    raise


def _remove_parts(out_dir: str, name: str, created: bool) -> None:
  for part in glob.glob(os.path.join(glob.escape(out_dir),
                                     f".{name}-*.part[0-9]*")):
    os.remove(part)
  if created:
    try:
      os.rmdir(out_dir)
    except OSError:  # not empty: someone else's files; leave them
      pass


def _skip_text(skipped: dict[str, int]) -> str:
  if not skipped:
    return "skipped: nothing"
  return "skipped: " + ", ".join(f"{n:,} {reason}"
                                 for reason, n in sorted(skipped.items()))


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
  """`prepared coco: 118,287 images, 591,753 pairs -> DIR (skipped: ...)`."""
  held = summary.get("eval_images", 0)
  held = f" ({held:,} of them in eval)" if held else ""
  return (f"prepared {summary['source']}: {summary['images']:,} images{held}, "
          f"{summary['pairs']:,} pairs -> {out_dir} "
          f"({_skip_text(summary['skipped'])})")


# ----------------------------------------------------------------------------
# Reading inputs. Each source checks what it can up front (files, folders,
# JSON structure), before any record is written, and returns (items, inputs).


def _check_file(path: str) -> str:
  if not os.path.isfile(path):
    raise DataError.at(path, "no such file")
  return os.path.abspath(path)


def _check_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise DataError.at(path, "no such image folder")
  return os.path.abspath(path)


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def _load_json(path: str) -> Any:
  _check_file(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError.at(path, f"not valid JSON ({_one_line(e)})") from None
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None


def _field(obj: Any, key: str, path: str, where: str,
           kind: type | tuple[type, ...] | None = None) -> Any:
  """obj[key], or a DataError naming the file, the entry and the field."""
  if not isinstance(obj, dict):
    raise DataError.at(path, f"{where} is a {type(obj).__name__}, expected "
                       f"an object with field {key!r}")
  if key not in obj:
    raise DataError.at(path, f"{where} has no field {key!r}")
  value = obj[key]
  if kind is not None and not isinstance(value, kind):
    names = " or ".join(k.__name__ for k in
                        (kind if isinstance(kind, tuple) else (kind,)))
    raise DataError.at(path, f"{where}.{key} is {json.dumps(value)[:60]}, "
                       f"expected {names}")
  return value


def _id_key(image_id: int | str) -> tuple[int, int, str]:
  """Sorts integer ids numerically, before any string ids."""
  if isinstance(image_id, int):
    return (0, image_id, "")
  return (1, 0, str(image_id))


class _ImageFolders:
  """Finds an image file by name in the first of several folders holding it."""

  def __init__(self, folders: Sequence[str]):
    self.folders = [_check_dir(d) for d in folders]
    # One listing per folder instead of a stat per image: COCO and VG
    # folders hold ~100k files, often on network file systems.
    self._index: dict[str, str] = {}
    for folder in self.folders:
      with os.scandir(folder) as entries:
        for e in entries:
          self._index.setdefault(e.name, e.path)

  def find(self, name: str) -> str | None:
    if name in self._index:
      return self._index[name]
    if "/" in name or os.sep in name:  # "train2014/x.jpg": not in a listing
      for folder in self.folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
          return path
    return None


def coco_items(captions_files: Sequence[str], image_folders: Sequence[str],
               karpathy: str | None = None
               ) -> tuple[Iterator[Item], list[str]]:
  """COCO captions files + image folders -> items in image-id order."""
  files: dict[int | str, tuple[str, str]] = {}  # id -> (file_name, json)
  captions: dict[int | str, list[str]] = collections.defaultdict(list)
  for path in captions_files:
    data = _load_json(path)
    images = _field(data, "images", path, "the top level", list)
    annotations = _field(data, "annotations", path, "the top level", list)
    for i, image in enumerate(images):
      image_id = _field(image, "id", path, f"images[{i}]", (int, str))
      file_name = _field(image, "file_name", path, f"images[{i}]", str)
      if image_id in files:
        raise DataError.at(path, f"images[{i}]: id {image_id} is also in "
                           f"{files[image_id][1]}; give captions files that "
                           "do not overlap")
      files[image_id] = (file_name, path)
    for i, ann in enumerate(annotations):
      image_id = _field(ann, "image_id", path, f"annotations[{i}]",
                        (int, str))
      caption = _field(ann, "caption", path, f"annotations[{i}]", str)
      if image_id not in files:
        raise DataError.at(path, f"annotations[{i}]: image_id {image_id} is "
                           "in no 'images' entry")
      captions[image_id].append(caption)
  held_out = _karpathy_held_out(karpathy) if karpathy else {}
  folders = _ImageFolders(image_folders)
  inputs = [os.path.abspath(p) for p in captions_files] + folders.folders
  if karpathy:
    inputs.append(os.path.abspath(karpathy))

  def items() -> Iterator[Item]:
    for image_id in sorted(files, key=_id_key):
      split = held_out.get(_as_int(image_id))
      if split is not None:
        yield Item(str(image_id), skip=f"karpathy {split}")
      else:
        yield Item(str(image_id), captions.get(image_id, ()),
                   path=folders.find(files[image_id][0]))
  return items(), inputs


def _as_int(value: int | str) -> int | None:
  try:
    return int(value)
  except ValueError:
    return None


def _karpathy_held_out(path: str) -> dict[int, str]:
  """Karpathy's dataset_coco.json -> {cocoid: "val" or "test"}."""
  data = _load_json(path)
  out = {}
  images = _field(data, "images", path, "the top level", list)
  for i, image in enumerate(images):
    split = _field(image, "split", path, f"images[{i}]", str)
    cocoid = _field(image, "cocoid", path, f"images[{i}]", (int, str))
    if split in ("val", "test"):
      if _as_int(cocoid) is None:
        raise DataError.at(path, f"images[{i}].cocoid is {cocoid!r}, "
                           "expected an integer")
      out[int(cocoid)] = split
  return out


def vg_items(regions_file: str, image_folders: Sequence[str]
             ) -> tuple[Iterator[Item], list[str]]:
  """Visual Genome region descriptions + image folders -> items by id."""
  data = _load_json(regions_file)
  if not isinstance(data, list):
    raise DataError.at(regions_file, "expected a JSON list of images "
                       "[{id, regions: [{phrase}]}], found a "
                       f"{type(data).__name__}")
  phrases: dict[int | str, list[str]] = {}
  for i, image in enumerate(data):
    image_id = _field(image, "id", regions_file, f"[{i}]", (int, str))
    regions = _field(image, "regions", regions_file, f"[{i}]", list)
    if image_id in phrases:
      raise DataError.at(regions_file, f"[{i}]: id {image_id} appears twice")
    phrases[image_id] = [
        _field(r, "phrase", regions_file, f"[{i}].regions[{k}]", str)
        for k, r in enumerate(regions)]
  del data  # the region boxes are not needed: free them before the run
  folders = _ImageFolders(image_folders)

  def items() -> Iterator[Item]:
    for image_id in sorted(phrases, key=_id_key):
      yield Item(str(image_id), phrases[image_id],
                 path=folders.find(f"{image_id}.jpg"))
  return items(), [os.path.abspath(regions_file)] + folders.folders


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def webdataset_items(patterns: Sequence[str]
                     ) -> tuple[Iterator[Item], list[str]]:
  """img2dataset tar shards (files or glob patterns) -> items in tar order."""
  shards = []
  for pattern in patterns:
    if any(c in pattern for c in "*?["):  # a glob pattern, as in the docs
      matches = sorted(glob.glob(pattern))
      if not matches:
        raise DataError.at(pattern, "no file matches")
      shards.extend(matches)
    else:
      shards.append(pattern)
  for shard in shards:  # all of them now, not after hours of writing
    _check_file(shard)
    try:
      with tarfile.open(shard, "r|*") as tar:
        tar.next()
    except _TAR_ERRORS as e:
      raise DataError.at(shard, f"not a tar archive ({_one_line(e)})") from None

  def items() -> Iterator[Item]:
    for shard in shards:
      for key, parts in _tar_samples(shard):
        ext = next((e for e in WEBDATASET_IMAGE_EXTS if e in parts), None)
        if ext is None:
          yield Item(key, skip=NO_IMAGE)
          continue
        caption = _sample_caption(parts)
        if caption is None:
          yield Item(key, skip=UNDECODABLE_CAPTION)
          continue
        yield Item(key, [caption] if caption else [], data=parts[ext])
  return items(), [os.path.abspath(s) for s in shards]


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Streams (key, {extension: bytes}) samples of one webdataset tar.

  A sample is a run of consecutive members with the same key: the member
  path up to the first dot of its file name (webdataset's convention).
  """
  wanted = set(WEBDATASET_IMAGE_EXTS) | {"txt", "json"}
  key, parts = None, {}
  try:
    # "r|*": stream, never seek, so a gzip'ed or piped shard works too.
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, base = posixpath.split(member.name)
        stem, dot, ext = base.partition(".")
        if not dot:
          continue
        k = posixpath.join(folder, stem)
        if k != key:
          if key is not None:
            yield key, parts
          key, parts = k, {}
        if ext.lower() in wanted:
          parts[ext.lower()] = tar.extractfile(member).read()
  except _TAR_ERRORS as e:
    raise DataError.at(path, f"unreadable tar ({_one_line(e)})") from None
  if key is not None:
    yield key, parts


def _sample_caption(parts: dict[str, bytes]) -> str | None:
  """KEY.txt, else KEY.json's "caption"; "" when none; None if undecodable."""
  try:
    if "txt" in parts:
      return parts["txt"].decode("utf-8")
    if "json" in parts:
      meta = json.loads(parts["json"])
      caption = meta.get("caption") if isinstance(meta, dict) else None
      return caption if isinstance(caption, str) else ""
  except (UnicodeDecodeError, json.JSONDecodeError):
    # One bad member among millions of crawled samples is a skip, not a stop.
    return None
  return ""


def tsv_items(path: str, images: str | None = None
              ) -> tuple[Iterator[Item], list[str]]:
  """A TSV or parquet table of (image path, caption) -> items, one per image.

  Rows of the same image path become one item with all of their captions;
  images keep the order of their first row.
  """
  _check_file(path)
  base = _check_dir(images) if images else os.path.dirname(
      os.path.abspath(path))
  rows = (_parquet_rows(path) if path.lower().endswith(".parquet")
          else _tsv_rows(path))
  groups: dict[str, list[str]] = {}
  for image, caption in rows:
    groups.setdefault(image, []).append(caption)

  def items() -> Iterator[Item]:
    for image, captions in groups.items():
      yield Item(image, captions, path=os.path.join(base, image))
  inputs = [os.path.abspath(path)] + ([base] if images else [])
  return items(), inputs


def _tsv_rows(path: str) -> Iterator[tuple[str, str]]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError:
        raise DataError.at(path, f"line {n}: not UTF-8 text") from None
      if n == 1:
        line = line.lstrip("\ufeff")  # a byte-order mark from spreadsheets
      if not line.strip():
        continue
      columns = line.split("\t", 1)  # a tab inside a caption stays in it
      if n == 1 and [c.strip().lower() for c in columns] == ["image",
                                                             "caption"]:
        continue
      if len(columns) < 2:
        raise DataError.at(path, f"line {n}: one column, expected "
                           "image<TAB>caption")
      if not columns[0].strip():
        raise DataError.at(path, f"line {n}: empty image path")
      yield columns[0].strip(), columns[1]


def _parquet_rows(path: str) -> Iterator[tuple[str, str]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError.at(path, "reading .parquet needs pyarrow (pip install "
                       "pyarrow), or convert it to TSV") from None
  try:
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
  except Exception as e:  # pylint: disable=broad-except
    # pyarrow raises ArrowInvalid, OSError, ... for a file that is not one.
    raise DataError.at(path, f"not a parquet file ({_one_line(e)})") from None
  for column in ("image", "caption"):
    if column not in names:
      raise DataError.at(path, f"no column {column!r} (columns: "
                         f"{', '.join(names)})")
  row = 0
  try:
    batches = table.iter_batches(columns=["image", "caption"])
    for batch in batches:
      for image, caption in zip(batch.column(0).to_pylist(),
                                batch.column(1).to_pylist()):
        row += 1
        if not isinstance(image, str) or not image.strip():
          raise DataError.at(path, f"row {row}: image is "
                             f"{str(image)[:40]!r}, expected a file path")
        if caption is not None and not isinstance(caption, str):
          raise DataError.at(path, f"row {row}: caption is "
                             f"{type(caption).__name__}, expected text")
        yield image.strip(), caption or ""
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError.at(path, f"row {row + 1}: unreadable "
                       f"({_one_line(e)})") from None


# ----------------------------------------------------------------------------
# The tokenizer over prepared corpora.


def corpus_dirs(paths: Sequence[str]) -> list[str]:
  """Prepared corpora, or folders of them (one per subdirectory), in order."""
  out = []
  for path in paths:
    if records.is_corpus(path):
      out.append(path)
    elif os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path)
                     if records.is_corpus(os.path.join(path, n)))
      if not found:
        raise DataError.at(path, "not a prepared corpus (no dataset_info."
                           "json) and holds none")
      out.extend(found)
    else:
      raise DataError.at(path, "no such directory")
  return out


def sample_captions(directories: Sequence[str], max_captions: int
                    ) -> list[str]:
  """Up to `max_captions` train captions, spread evenly over all corpora.

  Each corpus gives a share proportional to its pairs, taken at evenly spaced
  pair indices, so the subset is deterministic and covers every part of
  every corpus; with enough room every caption is taken.
  """
  splits = []
  for d in directories:
    try:
      splits.append(records.CorpusSplit(d, "train"))
    except OSError as e:
      raise DataError.at(d, f"cannot read its train split "
                         f"({_one_line(e)})") from None
  sizes = np.asarray([s.num_pairs for s in splits], np.int64)
  total = int(sizes.sum())
  take = min(max_captions, total)
  # Largest-remainder shares: they sum to `take` exactly.
  exact = sizes * take / max(total, 1)
  shares = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - shares), kind="stable")[:take - shares.sum()]:
    shares[i] += 1
  texts = []
  for split, size, share in zip(splits, sizes, shares):
    if not share:
      continue
    pairs = np.arange(share, dtype=np.int64) * int(size) // int(share)
    rows = np.searchsorted(split.pairs, pairs, side="right") - 1
    offsets = pairs - split.pairs[rows]
    # One read per record, in record order (ArrayRecord reads ahead).
    records_, starts = np.unique(rows, return_index=True)
    bounds = list(starts[1:]) + [len(rows)]
    for r, lo, hi in zip(records_, starts, bounds):
      captions = split[int(r)]["captions"]
      texts.extend(captions[int(k)] for k in offsets[lo:hi])
  return texts


def _tokenizer(args: argparse.Namespace) -> None:
  from eve_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  directories = corpus_dirs(args.corpora)
  texts = sample_captions(directories, args.max_captions)
  if not texts:
    raise DataError.at(directories[0], "no train captions to learn from")
  try:
    path = tokenizer.train_tokenizer(texts, args.out, args.vocab_size)
    vocab = tokenizer.Tokenizer(path).vocab_size
  except (RuntimeError, ValueError) as e:  # sentencepiece's errors
    raise DataError.at(args.out, f"training failed ({_one_line(e)})") from None
  print(f"tokenizer: {vocab:,} pieces -> {path} (trained on {len(texts):,} "
        f"captions of {len(directories)} "
        f"{'corpus' if len(directories) == 1 else 'corpora'})")


# ----------------------------------------------------------------------------
# Command line.


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _non_negative(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
  return value


def _name(text: str) -> str:
  if not _NAME.match(text):
    raise argparse.ArgumentTypeError(
        f"{text!r}: use lowercase letters, digits and _ (e.g. cc3m)")
  return text


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description="Convert an image-text corpus into a prepared "
      "corpus (tfds ArrayRecord) for eve_jax training, or train the "
      "tokenizer on prepared corpora.")
  sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

  def source(name: str, help_: str) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument("--out", required=True, metavar="DIR",
                   help="the corpus directory to write (must not hold one)")
    s.add_argument("--name", type=_name, default=name,
                   help=f"corpus name (default {name})")
    s.add_argument("--records_per_shard", type=_positive, default=2048,
                   metavar="N", help="images per shard file (default 2048)")
    s.add_argument("--eval_images", type=_non_negative, default=0,
                   metavar="N", help="hold out N images, picked by a hash "
                   "of their id, in split 'eval' (default 0)")
    s.add_argument("--workers", type=_positive, default=default_workers(),
                   metavar="N", help="threads reading and decoding images "
                   "(default min(8, cpus))")
    s.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="stop after N images (smoke runs)")
    return s

  coco = source("coco", "COCO captions (captions_*.json + image folders)")
  coco.add_argument("--captions", nargs="+", required=True, metavar="FILE",
                    help="captions_train2017.json, captions_val2014.json, ...")
  coco.add_argument("--images", nargs="+", required=True, metavar="DIR",
                    help="folders searched for each image's file_name")
  coco.add_argument("--exclude_karpathy_test", metavar="KARPATHY.json",
                    help="Karpathy's dataset_coco.json: drop its val and "
                    "test images (by cocoid)")
  vg = source("vg", "Visual Genome region descriptions")
  vg.add_argument("--regions", required=True, metavar="FILE",
                  help="region_descriptions.json")
  vg.add_argument("--images", nargs="+", required=True, metavar="DIR",
                  help="VG_100K, VG_100K_2: folders of {image_id}.jpg")
  wds = source("webdataset", "img2dataset tar shards (CC3M, CC12M, SBU)")
  wds.add_argument("--shards", nargs="+", required=True, metavar="TAR",
                   help="tar files or glob patterns ('cc3m/*.tar')")
  tsv = source("tsv", "a TSV (image<TAB>caption) or parquet table of local "
               "image paths")
  tsv.add_argument("--file", required=True, metavar="FILE",
                   help="the .tsv, or a .parquet with columns image, caption")
  tsv.add_argument("--images", metavar="DIR",
                   help="folder of relative image paths (default: the "
                   "file's folder)")
  tok = sub.add_parser(
      "tokenizer", help="train the SentencePiece model on prepared corpora",
      description="Train the SentencePiece tokenizer on the train captions "
      "of prepared corpora.")
  tok.add_argument("corpora", nargs="+", metavar="DIR",
                   help="prepared corpora, or folders of them")
  tok.add_argument("--out", required=True, metavar="MODEL",
                   help="the .model file to write")
  tok.add_argument("--vocab_size", type=_positive, default=30522)
  tok.add_argument("--max_captions", type=_positive, default=1_000_000,
                   help="captions to learn from, spread over all corpora")
  return p


_SOURCES: dict[str, Callable[[argparse.Namespace],
                             tuple[Iterator[Item], list[str]]]] = {
    "coco": lambda a: coco_items(a.captions, a.images,
                                 a.exclude_karpathy_test),
    "vg": lambda a: vg_items(a.regions, a.images),
    "webdataset": lambda a: webdataset_items(a.shards),
    "tsv": lambda a: tsv_items(a.file, a.images),
}


def _prepare(args: argparse.Namespace) -> None:
  if records.is_corpus(args.out):  # before reading gigabytes of JSON
    raise DataError.at(args.out, "already holds a prepared corpus; choose "
                       "another --out or delete it first")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise DataError.at(args.out, "exists and is not a directory")
  items, inputs = _SOURCES[args.source](args)
  summary = convert(items, args.out, args.name, inputs=inputs,
                    records_per_shard=args.records_per_shard,
                    eval_images=args.eval_images, workers=args.workers,
                    limit=args.limit)
  print(summary_line(summary, args.out), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (1: a one-line error)."""
  args = parser().parse_args(argv)
  # Pillow warns about palette transparency while converting to RGB: noise
  # for millions of web images, and the conversion is what we want.
  warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
  try:
    if args.source == "tokenizer":
      _tokenizer(args)
    else:
      _prepare(args)
  except DataError as e:
    print(f"eve_jax: error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # disk full, permissions: still one line
    print(f"eve_jax: error: {_one_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
