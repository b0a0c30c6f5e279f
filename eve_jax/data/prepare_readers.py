"""The readers of `python -m eve_jax.data.prepare`: one per source format
(COCO captions, Visual Genome regions, webdataset tars, TSV / parquet),
each `*_items(...) -> (items, inputs)` for the sink
(eve_jax/data/prepare_sink.py).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import posixpath
import tarfile
import zlib
from typing import Any, Iterator, Sequence


from eve_jax.data.errors import DataError

from eve_jax.data.prepare_sink import (
    NO_IMAGE,
    UNDECODABLE_CAPTION,
    Item,
    WEBDATASET_IMAGE_EXTS,
)

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


def one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def _load_json(path: str) -> Any:
  _check_file(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError.at(path, f"not valid JSON ({one_line(e)})") from None
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None


def _field(
    obj: Any,
    key: str,
    path: str,
    where: str,
    kind: type | tuple[type, ...] | None = None,
) -> Any:
  """obj[key], or a DataError naming the file, the entry and the field."""
  if not isinstance(obj, dict):
    raise DataError.at(
        path,
        f"{where} is a {type(obj).__name__}, expected "
        f"an object with field {key!r}",
    )
  if key not in obj:
    raise DataError.at(path, f"{where} has no field {key!r}")
  value = obj[key]
  if kind is not None and not isinstance(value, kind):
    names = " or ".join(
        k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))
    )
    raise DataError.at(
        path, f"{where}.{key} is {json.dumps(value)[:60]}, " f"expected {names}"
    )
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


def coco_items(
    captions_files: Sequence[str],
    image_folders: Sequence[str],
    karpathy: str | None = None,
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
        raise DataError.at(
            path,
            f"images[{i}]: id {image_id} is also in "
            f"{files[image_id][1]}; give captions files that "
            "do not overlap",
        )
      files[image_id] = (file_name, path)
    for i, ann in enumerate(annotations):
      image_id = _field(ann, "image_id", path, f"annotations[{i}]", (int, str))
      caption = _field(ann, "caption", path, f"annotations[{i}]", str)
      if image_id not in files:
        raise DataError.at(
            path,
            f"annotations[{i}]: image_id {image_id} is " "in no 'images' entry",
        )
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
        yield Item(
            str(image_id),
            captions.get(image_id, ()),
            path=folders.find(files[image_id][0]),
        )

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
        raise DataError.at(
            path, f"images[{i}].cocoid is {cocoid!r}, " "expected an integer"
        )
      out[int(cocoid)] = split
  return out


def vg_items(
    regions_file: str, image_folders: Sequence[str]
) -> tuple[Iterator[Item], list[str]]:
  """Visual Genome region descriptions + image folders -> items by id."""
  data = _load_json(regions_file)
  if not isinstance(data, list):
    raise DataError.at(
        regions_file,
        "expected a JSON list of images "
        "[{id, regions: [{phrase}]}], found a "
        f"{type(data).__name__}",
    )
  phrases: dict[int | str, list[str]] = {}
  for i, image in enumerate(data):
    image_id = _field(image, "id", regions_file, f"[{i}]", (int, str))
    regions = _field(image, "regions", regions_file, f"[{i}]", list)
    if image_id in phrases:
      raise DataError.at(regions_file, f"[{i}]: id {image_id} appears twice")
    phrases[image_id] = [
        _field(r, "phrase", regions_file, f"[{i}].regions[{k}]", str)
        for k, r in enumerate(regions)
    ]
  del data  # the region boxes are not needed: free them before the run
  folders = _ImageFolders(image_folders)

  def items() -> Iterator[Item]:
    for image_id in sorted(phrases, key=_id_key):
      yield Item(
          str(image_id), phrases[image_id], path=folders.find(f"{image_id}.jpg")
      )

  return items(), [os.path.abspath(regions_file)] + folders.folders


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def webdataset_items(
    patterns: Sequence[str],
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
      raise DataError.at(shard, f"not a tar archive ({one_line(e)})") from None

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
    raise DataError.at(path, f"unreadable tar ({one_line(e)})") from None
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


def tsv_items(
    path: str, images: str | None = None
) -> tuple[Iterator[Item], list[str]]:
  """A TSV or parquet table of (image path, caption) -> items, one per image.

  Rows of the same image path become one item with all of their captions;
  images keep the order of their first row.
  """
  _check_file(path)
  base = (
      _check_dir(images) if images else os.path.dirname(os.path.abspath(path))
  )
  rows = (
      _parquet_rows(path)
      if path.lower().endswith(".parquet")
      else _tsv_rows(path)
  )
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
      if n == 1 and [c.strip().lower() for c in columns] == [
          "image",
          "caption",
      ]:
        continue
      if len(columns) < 2:
        raise DataError.at(
            path, f"line {n}: one column, expected " "image<TAB>caption"
        )
      if not columns[0].strip():
        raise DataError.at(path, f"line {n}: empty image path")
      yield columns[0].strip(), columns[1]


def _parquet_rows(path: str) -> Iterator[tuple[str, str]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError.at(
        path,
        "reading .parquet needs pyarrow (pip install "
        "pyarrow), or convert it to TSV",
    ) from None
  try:
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
  except Exception as e:  # pylint: disable=broad-except
    # pyarrow raises ArrowInvalid, OSError, ... for a file that is not one.
    raise DataError.at(path, f"not a parquet file ({one_line(e)})") from None
  for column in ("image", "caption"):
    if column not in names:
      raise DataError.at(
          path, f"no column {column!r} (columns: " f"{', '.join(names)})"
      )
  row = 0
  try:
    batches = table.iter_batches(columns=["image", "caption"])
    for batch in batches:
      for image, caption in zip(
          batch.column(0).to_pylist(), batch.column(1).to_pylist()
      ):
        row += 1
        if not isinstance(image, str) or not image.strip():
          raise DataError.at(
              path,
              f"row {row}: image is "
              f"{str(image)[:40]!r}, expected a file path",
          )
        if caption is not None and not isinstance(caption, str):
          raise DataError.at(
              path,
              f"row {row}: caption is "
              f"{type(caption).__name__}, expected text",
          )
        yield image.strip(), caption or ""
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DataError.at(
        path, f"row {row + 1}: unreadable " f"({one_line(e)})"
    ) from None
