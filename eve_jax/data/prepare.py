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

The readers are eve_jax/data/prepare_readers.py, the validation and the
writing eve_jax/data/prepare_sink.py; this module is the command line and
the `tokenizer` command.

A malformed input stops the run with one line, `eve_jax: error: FILE: what`,
exit status 1, and no dataset_info.json (nothing that looks like a corpus).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np

from eve_jax.data import records
from eve_jax.data.errors import DataError
from eve_jax.data.prepare_readers import (
    coco_items,
    one_line,
    tsv_items,
    vg_items,
    webdataset_items,
)
from eve_jax.data.prepare_sink import (
    Item,
    convert,
    default_workers,
    summary_line,
)

PROG = "python -m eve_jax.data.prepare"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------
# The tokenizer over prepared corpora.


def corpus_dirs(paths: Sequence[str]) -> list[str]:
  """Prepared corpora, or folders of them (one per subdirectory), in order."""
  out = []
  for path in paths:
    if records.is_corpus(path):
      out.append(path)
    elif os.path.isdir(path):
      found = sorted(
          os.path.join(path, n)
          for n in os.listdir(path)
          if records.is_corpus(os.path.join(path, n))
      )
      if not found:
        raise DataError.at(
            path,
            "not a prepared corpus (no dataset_info." "json) and holds none",
        )
      out.extend(found)
    else:
      raise DataError.at(path, "no such directory")
  return out


def sample_captions(directories: Sequence[str], max_captions: int) -> list[str]:
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
      raise DataError.at(
          d, f"cannot read its train split " f"({one_line(e)})"
      ) from None
  sizes = np.asarray([s.num_pairs for s in splits], np.int64)
  total = int(sizes.sum())
  take = min(max_captions, total)
  # Largest-remainder shares: they sum to `take` exactly.
  exact = sizes * take / max(total, 1)
  shares = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - shares), kind="stable")[: take - shares.sum()]:
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
    raise DataError.at(args.out, f"training failed ({one_line(e)})") from None
  print(
      f"tokenizer: {vocab:,} pieces -> {path} (trained on {len(texts):,} "
      f"captions of {len(directories)} "
      f"{'corpus' if len(directories) == 1 else 'corpora'})"
  )


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
        f"{text!r}: use lowercase letters, digits and _ (e.g. cc3m)"
    )
  return text


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG,
      description="Convert an image-text corpus into a prepared "
      "corpus (tfds ArrayRecord) for eve_jax training, or train the "
      "tokenizer on prepared corpora.",
  )
  sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

  def source(name: str, help_: str) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the corpus directory to write (must not hold one)",
    )
    s.add_argument(
        "--name", type=_name, default=name, help=f"corpus name (default {name})"
    )
    s.add_argument(
        "--records_per_shard",
        type=_positive,
        default=2048,
        metavar="N",
        help="images per shard file (default 2048)",
    )
    s.add_argument(
        "--eval_images",
        type=_non_negative,
        default=0,
        metavar="N",
        help="hold out N images, picked by a hash "
        "of their id, in split 'eval' (default 0)",
    )
    s.add_argument(
        "--workers",
        type=_positive,
        default=default_workers(),
        metavar="N",
        help="threads reading and decoding images " "(default min(8, cpus))",
    )
    s.add_argument(
        "--limit",
        type=_positive,
        default=None,
        metavar="N",
        help="stop after N images (smoke runs)",
    )
    return s

  coco = source("coco", "COCO captions (captions_*.json + image folders)")
  coco.add_argument(
      "--captions",
      nargs="+",
      required=True,
      metavar="FILE",
      help="captions_train2017.json, captions_val2014.json, ...",
  )
  coco.add_argument(
      "--images",
      nargs="+",
      required=True,
      metavar="DIR",
      help="folders searched for each image's file_name",
  )
  coco.add_argument(
      "--exclude_karpathy_test",
      metavar="KARPATHY.json",
      help="Karpathy's dataset_coco.json: drop its val and "
      "test images (by cocoid)",
  )
  vg = source("vg", "Visual Genome region descriptions")
  vg.add_argument(
      "--regions",
      required=True,
      metavar="FILE",
      help="region_descriptions.json",
  )
  vg.add_argument(
      "--images",
      nargs="+",
      required=True,
      metavar="DIR",
      help="VG_100K, VG_100K_2: folders of {image_id}.jpg",
  )
  wds = source("webdataset", "img2dataset tar shards (CC3M, CC12M, SBU)")
  wds.add_argument(
      "--shards",
      nargs="+",
      required=True,
      metavar="TAR",
      help="tar files or glob patterns ('cc3m/*.tar')",
  )
  tsv = source(
      "tsv",
      "a TSV (image<TAB>caption) or parquet table of local " "image paths",
  )
  tsv.add_argument(
      "--file",
      required=True,
      metavar="FILE",
      help="the .tsv, or a .parquet with columns image, caption",
  )
  tsv.add_argument(
      "--images",
      metavar="DIR",
      help="folder of relative image paths (default: the " "file's folder)",
  )
  tok = sub.add_parser(
      "tokenizer",
      help="train the SentencePiece model on prepared corpora",
      description="Train the SentencePiece tokenizer on the train captions "
      "of prepared corpora.",
  )
  tok.add_argument(
      "corpora",
      nargs="+",
      metavar="DIR",
      help="prepared corpora, or folders of them",
  )
  tok.add_argument(
      "--out", required=True, metavar="MODEL", help="the .model file to write"
  )
  tok.add_argument("--vocab_size", type=_positive, default=30522)
  tok.add_argument(
      "--max_captions",
      type=_positive,
      default=1_000_000,
      help="captions to learn from, spread over all corpora",
  )
  return p


_SOURCES: dict[
    str, Callable[[argparse.Namespace], tuple[Iterator[Item], list[str]]]
] = {
    "coco": lambda a: coco_items(a.captions, a.images, a.exclude_karpathy_test),
    "vg": lambda a: vg_items(a.regions, a.images),
    "webdataset": lambda a: webdataset_items(a.shards),
    "tsv": lambda a: tsv_items(a.file, a.images),
}


def _prepare(args: argparse.Namespace) -> None:
  if args.out.startswith("gs://"):
    bucket_path = args.out
    raise DataError(
        f"--out {bucket_path}: a prepared corpus is written as ArrayRecord "
        "files, which go to a local directory only; prepare into a local "
        f"--out, copy it with `gcloud storage cp -r DIR {bucket_path}`, "
        "and train from a read-only gcsfuse mount of the bucket"
    )
  if records.is_corpus(args.out):  # before reading gigabytes of JSON
    raise DataError.at(
        args.out,
        "already holds a prepared corpus; choose "
        "another --out or delete it first",
    )
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise DataError.at(args.out, "exists and is not a directory")
  items, inputs = _SOURCES[args.source](args)
  summary = convert(
      items,
      args.out,
      args.name,
      inputs=inputs,
      records_per_shard=args.records_per_shard,
      eval_images=args.eval_images,
      workers=args.workers,
      limit=args.limit,
  )
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
    print(f"eve_jax: error: {one_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
