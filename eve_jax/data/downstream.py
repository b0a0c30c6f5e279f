"""Loaders for the official data files of EVE's downstream tasks.

Reads, with the standard library only, the files the benchmarks are
distributed as and returns plain frozen dataclasses holding image paths
(images are never opened here; `check_images` stats them when asked):

  * VQAv2 (`load_vqa`): `v2_OpenEnded_mscoco_{subtype}_questions.json`
    `{"questions": [{"image_id", "question", "question_id"}],
    "data_subtype": "train2014" | "val2014" | "test2015" | "test-dev2015", ...}`
    and, except for the test splits, `v2_mscoco_{subtype}_annotations.json`
    `{"annotations": [{"question_id", "image_id", "answers": [{"answer",
    "answer_confidence", "answer_id"}] * 10, "multiple_choice_answer",
    "answer_type", "question_type"}], ...}`; images
    `image_dir/COCO_{subtype}_{image_id:012d}.jpg`.
  * Visual Genome QA (`load_vg_qa`): `question_answers.json`, a list of
    `{"id": image_id, "qas": [{"qa_id", "image_id", "question", "answer"}]}`;
    images `image_dir/{image_id}.jpg`.
  * NLVR2 (`load_nlvr2`): `train.json`, `dev.json`, `test1.json`, one JSON
    object per line with `identifier` ("train-10171-0-0"), `sentence`,
    `label` ("True" / "False"), `directory` (train only), `left_url`, ...;
    images `{identifier without its last "-N"}-img0.png` and `-img1.png`, in
    `image_dir/{directory}/` for train and in `image_dir/` otherwise.
  * Karpathy retrieval splits (`load_karpathy`): `dataset_coco.json`,
    `dataset_flickr30k.json` `{"images": [{"filepath" (COCO only),
    "filename", "imgid", "split": "train" | "val" | "test" | "restval",
    "sentences": [{"raw", "tokens", ...}], "cocoid" (COCO only)}],
    "dataset": ...}`; images `image_root/filepath/filename` (or
    `image_root/filename` without a filepath).

`write_vqa_predictions` writes the VQA evaluation server's result file, a
JSON list `[{"question_id": int, "answer": str}, ...]`.

Every malformed input raises `DataError`, whose message is one
line naming the file and the entry, field or line at fault, e.g.
`.../v2_OpenEnded_mscoco_val2014_questions.json: questions[3] has no
'question_id'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from eve_jax.data.errors import DataError

from eve_jax.data.json_fields import (
    check_file,
    field,
    is_kind,
    list_field,
    load_json,
    one_line,
    show,
)

# NLVR2 labels are the strings "True" / "False"; JSON booleans (found in
# some re-distributions) mean the same.
_NLVR2_LABELS = {"True": True, "False": False, True: True, False: False}
# "{split}-{set}-{pair}-{sentence}", e.g. "train-10171-0-0", "test1-0-1-0".
_NLVR2_IDENTIFIER = re.compile(r"^([A-Za-z0-9]+)-(\d+)-(\d+)-(\d+)$")
KARPATHY_SPLITS = ("train", "val", "test", "restval")


@dataclasses.dataclass(frozen=True)
class VQAExample:
  """One VQAv2 (or Visual Genome) question.

  Attributes:
    question_id: the dataset's question id (VG: `qa_id`).
    image_id: the COCO (VG) image id.
    image_path: where the image should be (not checked).
    question: the question as written, e.g. "What color is the bus?".
    answers: the raw annotator answers (VQAv2: the 10 `answers[j].answer`;
      VG: the single answer repeated 10 times), None without annotations
      (test-dev, test-std).
    answer_type: the annotation's "yes/no", "number" or "other" (what the
      official evaluation reports accuracy per), None if not given.
  """

  question_id: int
  image_id: int
  image_path: str
  question: str
  answers: tuple[str, ...] | None
  answer_type: str | None = None


@dataclasses.dataclass(frozen=True)
class NLVR2Example:
  """One NLVR2 statement about a pair of images.

  Attributes:
    identifier: e.g. "train-10171-0-0" (split-set-pair-sentence).
    sentence: the statement.
    label: whether the statement is true of the pair.
    image_paths: (left, right) = (img0, img1), not checked.
  """

  identifier: str
  sentence: str
  label: bool
  image_paths: tuple[str, str]


@dataclasses.dataclass(frozen=True)
class RetrievalImage:
  """One image of a Karpathy split with its captions.

  Attributes:
    image_id: `str(cocoid)` for COCO, else the file name without extension
      (the Flickr30k photo id).
    image_path: `image_root/filepath/filename`, not checked.
    captions: the `raw` sentences, stripped (5 for COCO and Flickr30k; a few
      COCO images have 6 or 7).
  """

  image_id: str
  image_path: str
  captions: tuple[str, ...]


# --------------------------------------------------------------------------
# NLVR2.


def nlvr2_image_names(identifier: str) -> tuple[str, str]:
  """("{prefix}-img0.png", "{prefix}-img1.png"), prefix = identifier minus "-N"."""
  prefix = identifier.rsplit("-", 1)[0]
  return f"{prefix}-img0.png", f"{prefix}-img1.png"


def load_nlvr2(jsonl_path: str, image_dir: str) -> list[NLVR2Example]:
  """Reads an NLVR2 split file (JSON lines: train.json, dev.json, test1.json).

  Args:
    jsonl_path: the split's file.
    image_dir: the split's image folder: for train (identifiers
      "train-...") the folder holding the numbered `directory` sub-folders,
      for dev / test1 the folder holding the images themselves.

  Returns:
    One `NLVR2Example` per non-blank line, in the file's order.

  Raises:
    DataError: a missing file, a line that is not a JSON object,
      a missing field, a label other than "True" / "False", a malformed or
      duplicate identifier, a train example without `directory`.
  """
  path = jsonl_path
  check_file(path)
  out = []
  first_line: dict[str, int] = {}
  try:
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue  # a trailing newline or blank line
        where = f"line {line_no}"
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          # The decoder's own "line 1 column 29" would contradict `where`.
          raise DataError.at(
              path,
              f"{where}: not valid JSON ({e.msg} at column " f"{e.pos + 1})",
          ) from None
        except ValueError as e:  # UnicodeDecodeError
          raise DataError.at(
              path, f"{where}: not valid JSON ({one_line(e)})"
          ) from None
        identifier = field(obj, "identifier", path, where, str)
        sentence = field(obj, "sentence", path, where, str)
        raw_label = field(obj, "label", path, where)
        if (
            not isinstance(raw_label, (str, bool))
            or raw_label not in _NLVR2_LABELS
        ):
          raise DataError.at(
              path,
              f"{where}: label is {show(raw_label)}, "
              'expected "True" or "False"',
          )
        match = _NLVR2_IDENTIFIER.match(identifier)
        if not match:
          raise DataError.at(
              path,
              f"{where}: identifier {show(identifier)} is not "
              'split-set-pair-sentence (e.g. "dev-850-0-0")',
          )
        if identifier in first_line:
          raise DataError.at(
              path,
              f"{where}: identifier {identifier} "
              f"is also on line {first_line[identifier]}",
          )
        first_line[identifier] = line_no
        folder = image_dir
        if match.group(1) == "train":
          # Only train images are spread over numbered sub-folders; a
          # `directory` on other splits is ignored.
          directory = obj.get("directory")
          if directory is None:
            raise DataError.at(
                path,
                f"{where} has no 'directory' "
                "(train images live in "
                "image_dir/DIRECTORY/)",
            )
          if not (is_kind(directory, int) or is_kind(directory, str)):
            raise DataError.at(
                path,
                f"{where}: directory is "
                f"{show(directory)}, expected an "
                "integer or a string",
            )
          folder = os.path.join(image_dir, str(directory))
        left, right = nlvr2_image_names(identifier)
        out.append(
            NLVR2Example(
                identifier=identifier,
                sentence=sentence,
                label=_NLVR2_LABELS[raw_label],
                image_paths=(
                    os.path.join(folder, left),
                    os.path.join(folder, right),
                ),
            )
        )
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None
  return out


# --------------------------------------------------------------------------
# Karpathy retrieval splits.


def load_karpathy(
    json_path: str, image_root: str, split: str
) -> list[RetrievalImage]:
  """Reads one split of a Karpathy file (dataset_coco.json, dataset_flickr30k.json).

  "train" returns the images marked "train" and "restval": the ~30k COCO
  val2014 images outside the 5k val / 5k test that every retrieval
  fine-tuning recipe trains on (Flickr30k has no restval). "restval" alone,
  "val" and "test" return exactly the images marked so.

  Every image of the file is validated, whatever the split asked for, so a
  malformed file fails the same way for every split.

  Args:
    json_path: the Karpathy file.
    image_root: the folder holding `filepath/filename` (COCO: the folder of
      train2014/ and val2014/; Flickr30k: the folder of the images).
    split: "train", "val", "test" or "restval".

  Returns:
    One `RetrievalImage` per image of the split, in the file's order.

  Raises:
    ValueError: an unknown split.
    DataError: a missing or malformed file, an image without
      sentences, an empty caption, an unknown split name in the file, an
      image_id twice in the split.
  """
  if split not in KARPATHY_SPLITS:
    raise ValueError(
        f"split must be one of {', '.join(KARPATHY_SPLITS)}, " f"got {split!r}"
    )
  wanted = {"train", "restval"} if split == "train" else {split}
  path = json_path
  data = load_json(path)
  images = list_field(data, "images", path, "the file")
  out = []
  first: dict[str, int] = {}
  for i, image in enumerate(images):
    where = f"images[{i}]"
    image_split = field(image, "split", path, where, str)
    if image_split not in KARPATHY_SPLITS:
      raise DataError.at(
          path,
          f"{where}.split is {image_split!r}, "
          f"expected one of {', '.join(KARPATHY_SPLITS)}",
      )
    filename = field(image, "filename", path, where, str)
    folder = image_root
    if "filepath" in image:
      folder = os.path.join(
          image_root, field(image, "filepath", path, where, str)
      )
    sentences = list_field(image, "sentences", path, where)
    if not sentences:
      raise DataError.at(path, f"{where}.sentences is empty")
    captions = []
    for k, sentence in enumerate(sentences):
      raw = field(sentence, "raw", path, f"{where}.sentences[{k}]", str)
      if not raw.strip():
        raise DataError.at(path, f"{where}.sentences[{k}].raw is blank")
      captions.append(raw.strip())
    if "cocoid" in image:
      image_id = str(field(image, "cocoid", path, where, int))
    else:
      image_id = os.path.splitext(filename)[0]
    if image_split not in wanted:
      continue
    if image_id in first:
      raise DataError.at(
          path,
          f"{where}: image {image_id} is also " f"images[{first[image_id]}]",
      )
    first[image_id] = i
    out.append(
        RetrievalImage(
            image_id=image_id,
            image_path=os.path.join(folder, filename),
            captions=tuple(captions),
        )
    )
  return out


# --------------------------------------------------------------------------
# Images.


def _paths_of(example: Any) -> tuple[tuple[str, ...], str]:
  """(image paths, "what needs them") of one loaded example."""
  if isinstance(example, NLVR2Example):
    return example.image_paths, f"identifier {example.identifier}"
  if isinstance(example, VQAExample):
    return (example.image_path,), f"question_id {example.question_id}"
  if isinstance(example, RetrievalImage):
    return (example.image_path,), f"image_id {example.image_id}"
  raise TypeError(
      f"expected VQAExample, NLVR2Example or RetrievalImage, "
      f"got {type(example).__name__}"
  )


def check_images(
    examples: Iterable[VQAExample | NLVR2Example | RetrievalImage],
) -> int:
  """Checks that every image file the examples name exists (stat, no decode).

  Args:
    examples: loaded examples of any task.

  Returns:
    The number of distinct image files checked.

  Raises:
    DataError: naming the first missing image, the example that
      needs it and how many of the images are missing in all (a whole
      wrong folder and one lost file look different).
  """
  checked: set[str] = set()
  first_missing = None
  missing = 0
  for example in examples:
    paths, who = _paths_of(example)
    for image_path in paths:
      if image_path in checked:
        continue
      checked.add(image_path)
      if not os.path.isfile(image_path):
        missing += 1
        if first_missing is None:
          first_missing = (image_path, who)
  if first_missing is not None:
    image_path, who = first_missing
    raise DataError.at(
        image_path,
        f"no such image (needed by {who}; "
        f"{missing} of {len(checked)} images missing)",
    )
  return len(checked)
