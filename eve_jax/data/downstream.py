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

# The official test-dev questions name their subtype "test-dev2015", but
# test-dev is a subset of the test2015 images, whose files are named
# COCO_test2015_*.jpg.
_VQA_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}
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
# Validation helpers: every check names the file and the entry.


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def _show(value: Any) -> str:
  """A short one-line rendering of a JSON value for error messages."""
  try:
    text = json.dumps(value)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _check_file(path: str) -> None:
  if os.path.isdir(path):
    raise DataError.at(path, "is a folder, expected a file")
  if not os.path.isfile(path):
    raise DataError.at(path, "no such file")


def _load_json(path: str) -> Any:
  _check_file(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise DataError.at(path, f"not valid JSON ({_one_line(e)})") from None
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list",
               dict: "an object"}


def _is(value: Any, kind: type) -> bool:
  # JSON true/false load as bool, a subclass of int: never an id.
  if kind is int and isinstance(value, bool):
    return False
  return isinstance(value, kind)


def _field(obj: Any, key: str, path: str, where: str,
           kind: type | None = None) -> Any:
  """obj[key], or a DataError naming the file, entry and field.

  Args:
    obj: a decoded JSON value that should be an object.
    key: the field.
    path: the file, for the message.
    where: the entry, e.g. "questions[3]".
    kind: the expected type (int excludes bool), or None for any.

  Returns:
    The field's value.
  """
  if not isinstance(obj, dict):
    raise DataError.at(path, f"{where} is {_show(obj)}, expected an "
                              f"object with {key!r}")
  if key not in obj:
    raise DataError.at(path, f"{where} has no {key!r}")
  value = obj[key]
  if kind is not None and not _is(value, kind):
    raise DataError.at(path, f"{where}.{key} is {_show(value)}, "
                              f"expected {_KIND_NAMES[kind]}")
  return value


def _list_field(obj: Any, key: str, path: str, where: str) -> list[Any]:
  return _field(obj, key, path, where, list)


# --------------------------------------------------------------------------
# VQAv2 and Visual Genome QA.


def vqa_image_name(data_subtype: str, image_id: int) -> str:
  """The COCO file name of a VQAv2 image, e.g. COCO_val2014_000000000042.jpg."""
  subtype = _VQA_IMAGE_SUBTYPE.get(data_subtype, data_subtype)
  return f"COCO_{subtype}_{image_id:012d}.jpg"


def load_vqa(questions_json: str, annotations_json: str | None = None,
             image_dir: str = ".") -> list[VQAExample]:
  """Reads a VQAv2 questions file and, optionally, its annotations.

  Args:
    questions_json: `v2_OpenEnded_mscoco_{subtype}_questions.json`.
    annotations_json: `v2_mscoco_{subtype}_annotations.json`, or None (test
      splits): the examples then have `answers=None`.
    image_dir: the folder of the subtype's COCO images (e.g. `val2014/`).

  Returns:
    One `VQAExample` per question, in the file's order.

  Raises:
    DataError: a missing or malformed file, a duplicate
      question_id, a question without an annotation or whose annotation has
      another image_id, annotations of another data_subtype.
  """
  qpath = questions_json
  data = _load_json(qpath)
  questions = _list_field(data, "questions", qpath, "the file")
  subtype = _field(data, "data_subtype", qpath, "the file", str)
  rows = []
  first_index: dict[int, int] = {}
  for i, q in enumerate(questions):
    where = f"questions[{i}]"
    question_id = _field(q, "question_id", qpath, where, int)
    image_id = _field(q, "image_id", qpath, where, int)
    text = _field(q, "question", qpath, where, str)
    if question_id in first_index:
      raise DataError.at(
          qpath, f"{where}: question_id {question_id} is also "
          f"questions[{first_index[question_id]}]")
    first_index[question_id] = i
    rows.append((question_id, image_id, text))

  answers_of: dict[int, tuple[tuple[str, ...], str | None]] = {}
  if annotations_json is not None:
    answers_of = _vqa_answers(annotations_json, subtype, qpath, rows)

  examples = []
  for question_id, image_id, text in rows:
    answers, answer_type = answers_of.get(question_id, (None, None))
    examples.append(VQAExample(
        question_id=question_id, image_id=image_id,
        image_path=os.path.join(image_dir, vqa_image_name(subtype, image_id)),
        question=text, answers=answers, answer_type=answer_type))
  return examples


def _vqa_answers(apath: str, subtype: str, qpath: str,
                 rows: list[tuple[int, int, str]]
                 ) -> dict[int, tuple[tuple[str, ...], str | None]]:
  """question_id -> (raw answers, answer_type or None), checked against the
  questions' image ids."""
  data = _load_json(apath)
  annotations = _list_field(data, "annotations", apath, "the file")
  ann_subtype = data.get("data_subtype")
  # Pairing val questions with train annotations would fail later with a
  # confusing "no annotation" error; say what is wrong instead.
  if isinstance(ann_subtype, str) and ann_subtype != subtype:
    raise DataError.at(
        apath, f"data_subtype is {ann_subtype!r} but "
        f"{os.path.basename(qpath)} has {subtype!r}")
  found: dict[int, tuple[int, int, tuple[str, ...], str | None]] = {}
  for j, ann in enumerate(annotations):
    where = f"annotations[{j}]"
    question_id = _field(ann, "question_id", apath, where, int)
    image_id = _field(ann, "image_id", apath, where, int)
    answers = _list_field(ann, "answers", apath, where)
    if not answers:
      raise DataError.at(apath, f"{where}.answers is empty")
    texts = tuple(_field(a, "answer", apath, f"{where}.answers[{k}]", str)
                  for k, a in enumerate(answers))
    if question_id in found:
      raise DataError.at(
          apath, f"{where}: question_id {question_id} is also "
          f"annotations[{found[question_id][0]}]")
    answer_type = ann.get("answer_type")
    found[question_id] = (j, image_id, texts,
                          answer_type if isinstance(answer_type, str) else None)
  answers_of = {}
  for i, (question_id, image_id, _) in enumerate(rows):
    if question_id not in found:
      raise DataError.at(
          apath, f"no annotation for question_id {question_id} "
          f"(questions[{i}] of {os.path.basename(qpath)})")
    j, ann_image_id, texts, answer_type = found[question_id]
    if ann_image_id != image_id:
      raise DataError.at(
          apath, f"annotations[{j}] (question_id {question_id}) has image_id "
          f"{ann_image_id}, but questions[{i}] of {os.path.basename(qpath)} "
          f"has image_id {image_id}")
    answers_of[question_id] = (texts, answer_type)
  return answers_of


def load_vg_qa(qa_json: str, image_dir: str) -> list[VQAExample]:
  """Reads Visual Genome's `question_answers.json` as VQA examples.

  Each question gets its single answer repeated 10 times, as VQA
  fine-tuning recipes commonly do, so the VQAv2 soft score gives it 1.

  Args:
    qa_json: `question_answers.json`.
    image_dir: one folder holding every `{image_id}.jpg` (VG ships them in
      VG_100K and VG_100K_2: link both into one folder).

  Returns:
    One `VQAExample` per qa, question_id = qa_id, in the file's order.

  Raises:
    DataError: a missing or malformed file, a qa whose image_id
      is not its entry's id, a duplicate qa_id.
  """
  path = qa_json
  data = _load_json(path)
  if not isinstance(data, list):
    raise DataError.at(path, f"is {_show(data)}, expected a JSON list "
                              "of {\"id\", \"qas\"} objects")
  out = []
  first: dict[int, str] = {}
  for i, entry in enumerate(data):
    image_id = _field(entry, "id", path, f"[{i}]", int)
    image_path = os.path.join(image_dir, f"{image_id}.jpg")
    for k, qa in enumerate(_list_field(entry, "qas", path, f"[{i}]")):
      where = f"[{i}].qas[{k}]"
      qa_id = _field(qa, "qa_id", path, where, int)
      qa_image = _field(qa, "image_id", path, where, int)
      question = _field(qa, "question", path, where, str)
      answer = _field(qa, "answer", path, where, str)
      if qa_image != image_id:
        raise DataError.at(path, f"{where}.image_id is {qa_image}, but "
                                  f"[{i}].id is {image_id}")
      if qa_id in first:
        raise DataError.at(path, f"{where}: qa_id {qa_id} is also "
                                  f"{first[qa_id]}")
      first[qa_id] = where
      out.append(VQAExample(question_id=qa_id, image_id=image_id,
                            image_path=image_path, question=question,
                            answers=(answer,) * 10))
  return out


def write_vqa_predictions(path: str,
                          predictions: Iterable[tuple[int, str]]) -> str:
  """Writes answers in the VQA evaluation server's result format.

  Args:
    path: the result file, e.g. `vqav2_test-dev2015_eve_results.json`.
    predictions: (question_id, answer) pairs, one per question.

  Returns:
    path, written atomically: `[{"question_id": int, "answer": str}, ...]`.

  Raises:
    DataError: a question_id twice, an id that is not an integer,
      an answer that is not a string (nothing is written).
  """
  rows = []
  seen = set()
  for k, (question_id, answer) in enumerate(predictions):
    if isinstance(question_id, bool) or not hasattr(question_id, "__index__"):
      raise DataError.at(path, f"prediction {k}: question_id "
                                f"{question_id!r} is not an integer")
    question_id = int(question_id)  # numpy integers are not JSON numbers
    if not isinstance(answer, str):
      raise DataError.at(path, f"prediction {k}: answer {answer!r} "
                                "is not a string")
    if question_id in seen:
      raise DataError.at(path, f"prediction {k}: question_id "
                                f"{question_id} given twice")
    seen.add(question_id)
    rows.append({"question_id": question_id, "answer": answer})
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(rows, f)
  os.replace(tmp, path)
  return path


def load_vqa_predictions(path: str) -> dict[int, str]:
  """Reads a result file of `write_vqa_predictions`: question_id -> answer."""
  data = _load_json(path)
  if not isinstance(data, list):
    raise DataError.at(path, f"is {_show(data)}, expected a JSON list "
                              "of {\"question_id\", \"answer\"} objects")
  out: dict[int, str] = {}
  for k, row in enumerate(data):
    question_id = _field(row, "question_id", path, f"[{k}]", int)
    answer = _field(row, "answer", path, f"[{k}]", str)
    if question_id in out:
      raise DataError.at(path, f"[{k}]: question_id {question_id} "
                                "given twice")
    out[question_id] = answer
  return out


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
  _check_file(path)
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
              path, f"{where}: not valid JSON ({e.msg} at column "
              f"{e.pos + 1})") from None
        except ValueError as e:  # UnicodeDecodeError
          raise DataError.at(
              path, f"{where}: not valid JSON ({_one_line(e)})") from None
        identifier = _field(obj, "identifier", path, where, str)
        sentence = _field(obj, "sentence", path, where, str)
        raw_label = _field(obj, "label", path, where)
        if not isinstance(raw_label, (str, bool)) or raw_label not in _NLVR2_LABELS:
          raise DataError.at(path, f"{where}: label is {_show(raw_label)}, "
                                    "expected \"True\" or \"False\"")
        match = _NLVR2_IDENTIFIER.match(identifier)
        if not match:
          raise DataError.at(
              path, f"{where}: identifier {_show(identifier)} is not "
              "split-set-pair-sentence (e.g. \"dev-850-0-0\")")
        if identifier in first_line:
          raise DataError.at(path, f"{where}: identifier {identifier} "
                                    f"is also on line {first_line[identifier]}")
        first_line[identifier] = line_no
        folder = image_dir
        if match.group(1) == "train":
          # Only train images are spread over numbered sub-folders; a
          # `directory` on other splits is ignored.
          directory = obj.get("directory")
          if directory is None:
            raise DataError.at(path, f"{where} has no 'directory' "
                                      "(train images live in "
                                      "image_dir/DIRECTORY/)")
          if not (_is(directory, int) or _is(directory, str)):
            raise DataError.at(path, f"{where}: directory is "
                                      f"{_show(directory)}, expected an "
                                      "integer or a string")
          folder = os.path.join(image_dir, str(directory))
        left, right = nlvr2_image_names(identifier)
        out.append(NLVR2Example(
            identifier=identifier, sentence=sentence,
            label=_NLVR2_LABELS[raw_label],
            image_paths=(os.path.join(folder, left), os.path.join(folder, right))))
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None
  return out


# --------------------------------------------------------------------------
# Karpathy retrieval splits.


def load_karpathy(json_path: str, image_root: str,
                  split: str) -> list[RetrievalImage]:
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
    raise ValueError(f"split must be one of {', '.join(KARPATHY_SPLITS)}, "
                     f"got {split!r}")
  wanted = {"train", "restval"} if split == "train" else {split}
  path = json_path
  data = _load_json(path)
  images = _list_field(data, "images", path, "the file")
  out = []
  first: dict[str, int] = {}
  for i, image in enumerate(images):
    where = f"images[{i}]"
    image_split = _field(image, "split", path, where, str)
    if image_split not in KARPATHY_SPLITS:
      raise DataError.at(path, f"{where}.split is {image_split!r}, "
                                f"expected one of {', '.join(KARPATHY_SPLITS)}")
    filename = _field(image, "filename", path, where, str)
    folder = image_root
    if "filepath" in image:
      folder = os.path.join(image_root,
                            _field(image, "filepath", path, where, str))
    sentences = _list_field(image, "sentences", path, where)
    if not sentences:
      raise DataError.at(path, f"{where}.sentences is empty")
    captions = []
    for k, sentence in enumerate(sentences):
      raw = _field(sentence, "raw", path, f"{where}.sentences[{k}]", str)
      if not raw.strip():
        raise DataError.at(path, f"{where}.sentences[{k}].raw is blank")
      captions.append(raw.strip())
    if "cocoid" in image:
      image_id = str(_field(image, "cocoid", path, where, int))
    else:
      image_id = os.path.splitext(filename)[0]
    if image_split not in wanted:
      continue
    if image_id in first:
      raise DataError.at(path, f"{where}: image {image_id} is also "
                                f"images[{first[image_id]}]")
    first[image_id] = i
    out.append(RetrievalImage(image_id=image_id,
                              image_path=os.path.join(folder, filename),
                              captions=tuple(captions)))
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
  raise TypeError(f"expected VQAExample, NLVR2Example or RetrievalImage, "
                  f"got {type(example).__name__}")


def check_images(examples: Iterable[VQAExample | NLVR2Example | RetrievalImage]
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
    raise DataError.at(image_path, f"no such image (needed by {who}; "
                              f"{missing} of {len(checked)} images missing)")
  return len(checked)
