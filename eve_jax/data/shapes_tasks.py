"""EVE-Shapes versions of EVE's downstream tasks, written in the official formats.

Three small tasks on images of the EVE-Shapes generator (`shapes.generate`),
written to disk exactly as VQAv2, NLVR2 and the Karpathy retrieval splits
are distributed, so that the loaders of `eve_jax.data.downstream` and the
fine-tuning code run on them unchanged (and are exercised for real):

  DIR/vqa/        v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json
                  v2_mscoco_{train2014,val2014}_annotations.json
                  images/COCO_{subtype}_{image_id:012d}.jpg
  DIR/nlvr2/      {train,dev,test1}.json (JSON lines)
                  images/train/{directory}/train-{set}-0-img{0,1}.png
                  images/{dev,test1}/{split}-{set}-0-img{0,1}.png
  DIR/retrieval/  dataset_shapes.json (Karpathy format, splits train/val/test)
                  images/{train,val,test}/shapes_{split}_{index:06d}.jpg

Command line:

  python -m eve_jax.data.shapes_tasks --out DIR [--image_size 64]
      [--train N --val N --test N] [--seed S] [--nlvr2_families more,total]

Where every image comes from (so a test can regenerate it): split `split`
of task `task` is the generator stream `stream_seed(seed, task, split)` =
10_000 + 16 * seed + a slot per (task, split), never a pretraining stream
(those are 2 * seed and 2 * seed + 1) for seeds below 5_000.
  * VQA: image_id = 1_000_000 * (1 + split position) + index, the image is
    `generate(stream, index)`; question_id = image_id * 1000 + k as in VQAv2.
  * NLVR2: identifier "{split}-{j}-0-0"; img0 / img1 are
    `generate(stream, 2 j)` / `generate(stream, 2 j + 1)`.
  * Retrieval: the file name holds the index.

The tiny model's tokenizer is trained on captions only, so questions and
statements are short and reuse the caption words (a, small, large, colors,
shapes, left, of); other words are spelled out in characters.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from eve_jax.data.shapes_nlvr2 import (
    COUNT_FAMILIES,
    NLVR2_FAMILIES,
    check_families,
)
from eve_jax.data.shapes_tasks_common import (
    DEFAULT_SIZES,
    TASKS,
    VQA_ID_STRIDE,
    TaskFiles,
    stream_seed,
)
from eve_jax.data.shapes_vqa import write_vqa
from eve_jax.data.shapes_nlvr2 import write_nlvr2
from eve_jax.data.shapes_retrieval import write_retrieval

# --------------------------------------------------------------------------
# Everything.


def resolve_sizes(
    sizes: Mapping[str, Sequence[int]] | Sequence[int] | None,
) -> dict[str, tuple[int, int, int]]:
  """(train, val, test) per task.

  Args:
    sizes: None (DEFAULT_SIZES), one (train, val, test) for every task, or
      {task: (train, val, test)} overriding the defaults of those tasks.

  Returns:
    {task: (train, val, test)} for every task.
  """
  out = dict(DEFAULT_SIZES)
  if sizes is None:
    return out
  if isinstance(sizes, Mapping):
    unknown = set(sizes) - set(TASKS)
    if unknown:
      raise ValueError(
          f"unknown task(s) {sorted(unknown)} in sizes, "
          f"expected some of {TASKS}"
      )
    out.update({task: tuple(v) for task, v in sizes.items()})
  else:
    out = {task: tuple(sizes) for task in TASKS}
  for task, v in out.items():
    if len(v) != 3 or not all(
        isinstance(x, (int, np.integer)) and 0 <= x < VQA_ID_STRIDE for x in v
    ):
      raise ValueError(
          f"sizes of {task} must be 3 integers in "
          f"[0, {VQA_ID_STRIDE}), got {v}"
      )
    out[task] = tuple(int(x) for x in v)
  return out


def write_all(
    out_dir: str,
    *,
    image_size: int = 64,
    sizes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    seed: int = 0,
    nlvr2_families: Sequence[str] = COUNT_FAMILIES,
) -> TaskFiles:
  """Writes the three EVE-Shapes tasks under out_dir in the official formats.

  The files are a pure function of the arguments: the same
  arguments write byte-identical files. Files of an earlier, larger run in
  the same folder are overwritten or, if not rewritten, left in place
  (nothing refers to them).

  Args:
    out_dir: the output folder (created).
    image_size: H = W of every image in pixels.
    sizes: see `resolve_sizes`; None for DEFAULT_SIZES.
    seed: data seed, >= 0.
    nlvr2_families: the NLVR2 statement families (`nlvr2_statement`).

  Returns:
    The paths and counts (`TaskFiles`).
  """
  if image_size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}")
  resolved = resolve_sizes(sizes)
  nlvr2_families = check_families(nlvr2_families)
  stream_seed(seed, "vqa", "train2014")  # validates the seed first
  vqa_q, vqa_a, vqa_images, n_vqa_images, n_vqa_questions = write_vqa(
      out_dir, image_size, resolved["vqa"], seed
  )
  nlvr2, nlvr2_images, n_nlvr2 = write_nlvr2(
      out_dir, image_size, resolved["nlvr2"], seed, nlvr2_families
  )
  retrieval, retrieval_images, n_retrieval = write_retrieval(
      out_dir, image_size, resolved["retrieval"], seed
  )
  return TaskFiles(
      root=out_dir,
      vqa_questions=vqa_q,
      vqa_annotations=vqa_a,
      vqa_images=vqa_images,
      nlvr2=nlvr2,
      nlvr2_images=nlvr2_images,
      retrieval=retrieval,
      retrieval_images=retrieval_images,
      counts={
          "vqa_images": n_vqa_images,
          "vqa_questions": n_vqa_questions,
          "nlvr2_examples": n_nlvr2,
          "nlvr2_images": 2 * n_nlvr2,
          "retrieval_images": n_retrieval,
          "retrieval_captions": 5 * n_retrieval,
      },
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m eve_jax.data.shapes_tasks",
      description="Writes EVE-Shapes VQA, NLVR2 and retrieval data in the "
      "official VQAv2 / NLVR2 / Karpathy formats.",
  )
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument(
      "--train",
      type=int,
      default=None,
      help="train size of every task (default: per task)",
  )
  parser.add_argument(
      "--val", type=int, default=None, help="val / dev size of every task"
  )
  parser.add_argument(
      "--test", type=int, default=None, help="test / test1 size of every task"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--nlvr2_families",
      default=",".join(COUNT_FAMILIES),
      help=f"comma-separated NLVR2 statement families, some of "
      f"{','.join(NLVR2_FAMILIES)}",
  )
  args = parser.parse_args(argv)
  sizes = {}
  for task in TASKS:
    default = DEFAULT_SIZES[task]
    sizes[task] = tuple(
        d if v is None else v
        for v, d in zip((args.train, args.val, args.test), default)
    )
  start = time.perf_counter()
  try:
    files = write_all(
        args.out,
        image_size=args.image_size,
        sizes=sizes,
        seed=args.seed,
        nlvr2_families=args.nlvr2_families.split(","),
    )
  except ValueError as e:
    print(f"eve_jax: error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  c = files.counts
  print(
      f"vqa: {c['vqa_images']} images, {c['vqa_questions']} questions "
      f"-> {os.path.join(args.out, 'vqa')}"
  )
  print(
      f"nlvr2: {c['nlvr2_examples']} statements, {c['nlvr2_images']} "
      f"images -> {os.path.join(args.out, 'nlvr2')}"
  )
  print(
      f"retrieval: {c['retrieval_images']} images, "
      f"{c['retrieval_captions']} captions -> {files.retrieval}"
  )
  print(f"wrote in {seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
