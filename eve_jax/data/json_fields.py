"""Reading the JSON files of the downstream datasets field by field, so
that every malformed input is one line naming the file, the entry and the
field (eve_jax/data/downstream.py, downstream_vqa.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from eve_jax.data.errors import DataError

# --------------------------------------------------------------------------
# Validation helpers: every check names the file and the entry.


def one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def show(value: Any) -> str:
  """A short one-line rendering of a JSON value for error messages."""
  try:
    text = json.dumps(value)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def check_file(path: str) -> None:
  if os.path.isdir(path):
    raise DataError.at(path, "is a folder, expected a file")
  if not os.path.isfile(path):
    raise DataError.at(path, "no such file")


def load_json(path: str) -> Any:
  check_file(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise DataError.at(path, f"not valid JSON ({one_line(e)})") from None
  except OSError as e:
    raise DataError.at(path, f"cannot read ({e.strerror})") from None


KIND_NAMES = {
    int: "an integer",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def is_kind(value: Any, kind: type) -> bool:
  # JSON true/false load as bool, a subclass of int: never an id.
  if kind is int and isinstance(value, bool):
    return False
  return isinstance(value, kind)


def field(
    obj: Any, key: str, path: str, where: str, kind: type | None = None
) -> Any:
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
    raise DataError.at(
        path, f"{where} is {show(obj)}, expected an " f"object with {key!r}"
    )
  if key not in obj:
    raise DataError.at(path, f"{where} has no {key!r}")
  value = obj[key]
  if kind is not None and not is_kind(value, kind):
    raise DataError.at(
        path, f"{where}.{key} is {show(value)}, " f"expected {KIND_NAMES[kind]}"
    )
  return value


def list_field(obj: Any, key: str, path: str, where: str) -> list[Any]:
  return field(obj, key, path, where, list)
