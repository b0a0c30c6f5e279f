"""VQAv2 and Visual Genome QA in their official formats: the loaders,
the image file names, and the evaluation server's prediction files
(eve_jax/data/downstream.py has the examples and the other tasks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from eve_jax import storage
from eve_jax.data.errors import DataError

from eve_jax.data.downstream import VQAExample
from eve_jax.data.json_fields import field, list_field, load_json, show

# The official test-dev questions name their subtype "test-dev2015", but
# test-dev is a subset of the test2015 images, whose files are named
# COCO_test2015_*.jpg.
_VQA_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}

# --------------------------------------------------------------------------
# VQAv2 and Visual Genome QA.


def vqa_image_name(data_subtype: str, image_id: int) -> str:
  """The COCO file name of a VQAv2 image, e.g. COCO_val2014_000000000042.jpg."""
  subtype = _VQA_IMAGE_SUBTYPE.get(data_subtype, data_subtype)
  return f"COCO_{subtype}_{image_id:012d}.jpg"


def load_vqa(
    questions_json: str,
    annotations_json: str | None = None,
    image_dir: str = ".",
) -> list[VQAExample]:
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
  data = load_json(qpath)
  questions = list_field(data, "questions", qpath, "the file")
  subtype = field(data, "data_subtype", qpath, "the file", str)
  rows = []
  first_index: dict[int, int] = {}
  for i, q in enumerate(questions):
    where = f"questions[{i}]"
    question_id = field(q, "question_id", qpath, where, int)
    image_id = field(q, "image_id", qpath, where, int)
    text = field(q, "question", qpath, where, str)
    if question_id in first_index:
      raise DataError.at(
          qpath,
          f"{where}: question_id {question_id} is also "
          f"questions[{first_index[question_id]}]",
      )
    first_index[question_id] = i
    rows.append((question_id, image_id, text))

  answers_of: dict[int, tuple[tuple[str, ...], str | None]] = {}
  if annotations_json is not None:
    answers_of = _vqa_answers(annotations_json, subtype, qpath, rows)

  examples = []
  for question_id, image_id, text in rows:
    answers, answer_type = answers_of.get(question_id, (None, None))
    examples.append(
        VQAExample(
            question_id=question_id,
            image_id=image_id,
            image_path=os.path.join(
                image_dir, vqa_image_name(subtype, image_id)
            ),
            question=text,
            answers=answers,
            answer_type=answer_type,
        )
    )
  return examples


def _vqa_answers(
    apath: str, subtype: str, qpath: str, rows: list[tuple[int, int, str]]
) -> dict[int, tuple[tuple[str, ...], str | None]]:
  """question_id -> (raw answers, answer_type or None), checked against the
  questions' image ids."""
  data = load_json(apath)
  annotations = list_field(data, "annotations", apath, "the file")
  ann_subtype = data.get("data_subtype")
  # Pairing val questions with train annotations would fail later with a
  # confusing "no annotation" error; say what is wrong instead.
  if isinstance(ann_subtype, str) and ann_subtype != subtype:
    raise DataError.at(
        apath,
        f"data_subtype is {ann_subtype!r} but "
        f"{os.path.basename(qpath)} has {subtype!r}",
    )
  found: dict[int, tuple[int, int, tuple[str, ...], str | None]] = {}
  for j, ann in enumerate(annotations):
    where = f"annotations[{j}]"
    question_id = field(ann, "question_id", apath, where, int)
    image_id = field(ann, "image_id", apath, where, int)
    answers = list_field(ann, "answers", apath, where)
    if not answers:
      raise DataError.at(apath, f"{where}.answers is empty")
    texts = tuple(
        field(a, "answer", apath, f"{where}.answers[{k}]", str)
        for k, a in enumerate(answers)
    )
    if question_id in found:
      raise DataError.at(
          apath,
          f"{where}: question_id {question_id} is also "
          f"annotations[{found[question_id][0]}]",
      )
    answer_type = ann.get("answer_type")
    found[question_id] = (
        j,
        image_id,
        texts,
        answer_type if isinstance(answer_type, str) else None,
    )
  answers_of = {}
  for i, (question_id, image_id, _) in enumerate(rows):
    if question_id not in found:
      raise DataError.at(
          apath,
          f"no annotation for question_id {question_id} "
          f"(questions[{i}] of {os.path.basename(qpath)})",
      )
    j, ann_image_id, texts, answer_type = found[question_id]
    if ann_image_id != image_id:
      raise DataError.at(
          apath,
          f"annotations[{j}] (question_id {question_id}) has image_id "
          f"{ann_image_id}, but questions[{i}] of {os.path.basename(qpath)} "
          f"has image_id {image_id}",
      )
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
  data = load_json(path)
  if not isinstance(data, list):
    raise DataError.at(
        path,
        f"is {show(data)}, expected a JSON list " 'of {"id", "qas"} objects',
    )
  out = []
  first: dict[int, str] = {}
  for i, entry in enumerate(data):
    image_id = field(entry, "id", path, f"[{i}]", int)
    image_path = os.path.join(image_dir, f"{image_id}.jpg")
    for k, qa in enumerate(list_field(entry, "qas", path, f"[{i}]")):
      where = f"[{i}].qas[{k}]"
      qa_id = field(qa, "qa_id", path, where, int)
      qa_image = field(qa, "image_id", path, where, int)
      question = field(qa, "question", path, where, str)
      answer = field(qa, "answer", path, where, str)
      if qa_image != image_id:
        raise DataError.at(
            path,
            f"{where}.image_id is {qa_image}, but " f"[{i}].id is {image_id}",
        )
      if qa_id in first:
        raise DataError.at(
            path, f"{where}: qa_id {qa_id} is also " f"{first[qa_id]}"
        )
      first[qa_id] = where
      out.append(
          VQAExample(
              question_id=qa_id,
              image_id=image_id,
              image_path=image_path,
              question=question,
              answers=(answer,) * 10,
          )
      )
  return out


def write_vqa_predictions(
    path: str, predictions: Iterable[tuple[int, str]]
) -> str:
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
      raise DataError.at(
          path,
          f"prediction {k}: question_id " f"{question_id!r} is not an integer",
      )
    question_id = int(question_id)  # numpy integers are not JSON numbers
    if not isinstance(answer, str):
      raise DataError.at(
          path, f"prediction {k}: answer {answer!r} " "is not a string"
      )
    if question_id in seen:
      raise DataError.at(
          path, f"prediction {k}: question_id " f"{question_id} given twice"
      )
    seen.add(question_id)
    rows.append({"question_id": question_id, "answer": answer})
  if storage.is_gcs(path):  # one upload: atomic by itself
    storage.write_text(path, json.dumps(rows))
    return path
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(rows, f)
  os.replace(tmp, path)
  return path


def load_vqa_predictions(path: str) -> dict[int, str]:
  """Reads a result file of `write_vqa_predictions`: question_id -> answer."""
  data = load_json(path)
  if not isinstance(data, list):
    raise DataError.at(
        path,
        f"is {show(data)}, expected a JSON list "
        'of {"question_id", "answer"} objects',
    )
  out: dict[int, str] = {}
  for k, row in enumerate(data):
    question_id = field(row, "question_id", path, f"[{k}]", int)
    answer = field(row, "answer", path, f"[{k}]", str)
    if question_id in out:
      raise DataError.at(
          path, f"[{k}]: question_id {question_id} " "given twice"
      )
    out[question_id] = answer
  return out
