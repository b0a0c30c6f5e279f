"""The sink of `python -m eve_jax.data.prepare`: items -> validated images
-> a prepared corpus (eve_jax/data/records.py).

A reader (eve_jax/data/prepare_readers.py) yields `Item`s; `convert`
decodes every image in full (worker threads, results in input order),
skips and counts what cannot be used, holds out `eval_images` by the hash
of their ids, and writes the records, dataset_info.json last.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import heapq
import io
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from PIL import Image

from eve_jax.data import records
from eve_jax.data.errors import DataError

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
      hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "big"
  )


def default_workers() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return max(1, min(8, cpus))


# ----------------------------------------------------------------------------
# Conversion: items -> validated images -> records.


def _validated(
    items: Iterable[Item], workers: int
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
  pool = concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix="prepare"
  )
  try:
    for item in items:
      captions = [clean_caption(c) for c in item.captions]
      kept = [c for c in captions if c]
      future = None
      if (
          item.skip is None
          and kept
          and (item.path is not None or item.data is not None)
      ):
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

  def __init__(
      self,
      writer: records.CorpusWriter,
      source: str,
      eval_images: int,
      spill_dir: str,
  ):
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
      self.writer.add(
          self._unspill(old_seq), old_captions, old_id, self.source, "train"
      )
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
    for _, _, seq, captions, image_id in sorted(self._heap, key=lambda e: e[2]):
      self.writer.add(
          self._unspill(seq), captions, image_id, self.source, "eval"
      )
    self._heap = []


def convert(
    items: Iterable[Item],
    out_dir: str,
    name: str,
    *,
    inputs: Sequence[str],
    records_per_shard: int = 2048,
    eval_images: int = 0,
    workers: int | None = None,
    limit: int | None = None,
    log: Any = sys.stderr,
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
  writer = records.CorpusWriter(
      out_dir, name, records_per_shard=records_per_shard
  )
  try:
    with tempfile.TemporaryDirectory(
        dir=writer.out_dir, prefix=".eval-spill-"
    ) as spill:
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
            print(
                f"prepare {name}: {seen:,} images read, {sink.images:,} "
                f"kept ({rate:,.0f} images/s)",
                file=log,
                flush=True,
            )
          if limit is not None and sink.images >= limit:
            break
      if sink.images <= eval_images:
        what = (
            f"no usable image ({_skip_text(skipped)})"
            if not sink.images
            else f"only {sink.images:,} usable images, --eval_images "
            f"{eval_images:,} would leave none for training"
        )
        raise DataError.at(inputs[0] if inputs else out_dir, what)
      held_out = sink.held_out
      sink.finish()
    summary = dict(
        source=name,
        inputs=list(inputs),
        images=sink.images,
        pairs=sink.pairs,
        eval_images=held_out,
        reencoded_as_jpeg=reencoded,
        skipped=dict(sorted(skipped.items())),
        limit=limit,
    )
    summary["splits"] = writer.close(summary)
    return summary
  except BaseException:
    # The writer's own error path: close the open shard files, write no
    # metadata. Then drop the unnamed shards so a rerun starts clean.
    writer.__exit__(*sys.exc_info())
    _remove_parts(writer.out_dir, name, created)
    raise


def _remove_parts(out_dir: str, name: str, created: bool) -> None:
  for part in glob.glob(
      os.path.join(glob.escape(out_dir), f".{name}-*.part[0-9]*")
  ):
    os.remove(part)
  if created:
    try:
      os.rmdir(out_dir)
    except OSError:  # not empty: someone else's files; leave them
      pass


def _skip_text(skipped: dict[str, int]) -> str:
  if not skipped:
    return "skipped: nothing"
  return "skipped: " + ", ".join(
      f"{n:,} {reason}" for reason, n in sorted(skipped.items())
  )


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
  """`prepared coco: 118,287 images, 591,753 pairs -> DIR (skipped: ...)`."""
  held = summary.get("eval_images", 0)
  held = f" ({held:,} of them in eval)" if held else ""
  return (
      f"prepared {summary['source']}: {summary['images']:,} images{held}, "
      f"{summary['pairs']:,} pairs -> {out_dir} "
      f"({_skip_text(summary['skipped'])})"
  )
