"""A trained workdir as a model ready to run, and its inputs from files.

`load(DIR)` reads DIR/config.json (which task trained it), DIR/tokenizer.model
and the newest checkpoint, builds the task's model and puts the weights in
(through `eve_jax.pretrained.match`, so scanned or unrolled layouts both
load). Used by `python -m eve_jax.predict` and `python -m eve_jax.viz`.

  pretrain   EVEPretrainModel: MLM head, MIM decoder (and ITC/ITM heads when
             the run had objective itc)
  vqa        VQAModel, with DIR/answers.json (the classifier's answers)
  retrieval  RetrievalModel (ITC + ITM)
  nlvr2      NLVR2Model

Errors a user can cause (no workdir, another kind of workdir, an image
that does not decode, text too long) are `InputError`s with a one-line
message; `cli_main` prints them as `eve_jax: error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from eve_jax import pretrained, storage
from eve_jax.data import finetune_data
from eve_jax.data.tokenizer import Tokenizer, load_tokenizer
from eve_jax.model.variants import ModelConfig

MASK = "[MASK]"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class InputError(ValueError):
  """Bad input from the command line; the message is one line."""


@dataclasses.dataclass
class Workdir:
  """A loaded run.

  Attributes:
    path: the directory.
    kind: config.json's task: pretrain, vqa, retrieval or nlvr2.
    config: config.json as a dict.
    model_cfg: the model's typed config (unrolled layers, einsum attention:
      the same outputs as the training layout, and every block reachable
      for Grad-CAM).
    model: the nnx model with the checkpoint's weights.
    tokenizer: the run's tokenizer.
    step: the checkpoint's step.
    answers: the VQA answer of each classifier output (vqa only).
  """

  path: str
  kind: str
  config: dict[str, Any]
  model_cfg: ModelConfig
  model: Any
  tokenizer: Tokenizer
  step: int
  answers: list[str] | None = None

  @property
  def has_matching_heads(self) -> bool:
    return getattr(self.model, "matching", None) is not None


def _objectives(config: dict[str, Any]) -> tuple[str, ...]:
  return tuple(
      o.strip()
      for o in str(config.get("objectives", "mlm,mim")).split(",")
      if o.strip()
  )


def read_answers(
    directory: str, config: dict[str, Any], tokenizer, model_cfg: ModelConfig
) -> list[str]:
  """DIR/answers.json, or (runs from before it was written) the vocabulary
  rebuilt from the training data config.json names."""
  from eve_jax.tasks import vqa  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, vqa.ANSWERS_FILE)
  if storage.isfile(path):
    return list(json.loads(storage.read_text(path)))
  import ml_collections  # pylint: disable=g-import-not-at-top
  from eve_jax.finetune import shapes_tasks_dir  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict(config)
  data_dir = c.data.dir or (
      shapes_tasks_dir(c, directory) if c.data.get("shapes", False) else ""
  )
  try:
    return list(vqa.VQATask(c, tokenizer, model_cfg, data_dir=data_dir).vocab)
  except (OSError, ValueError) as e:
    raise InputError(
        f"{directory} has no {vqa.ANSWERS_FILE} and its "
        f"training data cannot be read to rebuild it: "
        f"{str(e).splitlines()[0]}"
    ) from None


def _build(kind: str, cfg: ModelConfig, answers, rngs):
  from eve_jax.tasks import registry  # pylint: disable=g-import-not-at-top

  return registry.get(kind).inference_model(
      cfg, rngs, **({"num_answers": len(answers)} if answers else {})
  )


def _nest(flat: dict[tuple, np.ndarray]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = value
  return out


def _tokenizer(directory: str):
  """DIR/tokenizer.model (SentencePiece, or a fine-tuning run's copy of a
  converted checkpoint's JSON one), else DIR/tokenizer.json."""
  try:
    return load_tokenizer(pretrained.tokenizer_path(directory))
  except pretrained.InitError:
    raise InputError(
        f"--workdir {directory} has no tokenizer.model or " "tokenizer.json"
    ) from None


def restore_params(directory: str) -> tuple[dict[str, Any], int]:
  """`pretrained.load_params` (parameters only, on one device, whatever
  topology the run saved them from) with its errors as InputError."""
  try:
    return pretrained.load_params(directory, flag="--workdir")
  except pretrained.InitError as e:
    raise InputError(str(e)) from None


def model_overrides(items: Sequence[str]) -> dict[str, Any]:
  """`--set model.KEY=VALUE ...` -> {KEY: value}: the config.model keys to
  run a saved model with instead of its config.json's (e.g.
  model.capacity_factor=0 for no dropping, model.moe_group=sample). Values
  are read as JSON (numbers, true/false, quoted strings), else kept as the
  text; unknown keys are refused when the model is built."""
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key.startswith("model.") or len(key) <= 6:
      raise InputError(f"--set {item!r}: expected model.KEY=VALUE")
    try:
      out[key[6:]] = json.loads(value)
    except json.JSONDecodeError:
      out[key[6:]] = value
  return out


def load(
    directory: str,
    kinds: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
) -> Workdir:
  """Loads a workdir's newest checkpoint.

  Args:
    directory: a run directory written by `python -m eve_jax.main`.
    kinds: the tasks the caller can use ("" = any); another is an error
      naming what is needed.
    overrides: config.model keys to change (`model_overrides`); only
      keys that leave the parameters' shapes alone can load.

  Raises:
    InputError: no such run, another kind, or a checkpoint that does not
      fit its config.
  """
  try:
    storage.check_dir(directory, "--workdir")
    if not storage.isdir(directory):
      raise InputError(f"--workdir {directory}: no such directory")
    path = os.path.join(directory, "config.json")
    if not storage.isfile(path):
      raise InputError(
          f"--workdir {directory} has no config.json: not a "
          "run directory of python -m eve_jax.main"
      )
    config = json.loads(storage.read_text(path))
  except (storage.StorageError, json.JSONDecodeError) as e:
    raise InputError(str(e).splitlines()[0]) from None
  kind = config.get("task", "pretrain")
  if kinds and kind not in kinds:
    raise InputError(
        f"--workdir {directory} is a {kind} run; this needs "
        f"a {' or '.join(kinds)} run"
    )
  tokenizer = _tokenizer(directory)
  if not storage.isdir(os.path.join(directory, "checkpoints")):
    raise InputError(
        f"--workdir {directory} has no checkpoints/ (the run "
        "has not saved one yet)"
    )
  try:
    cfg = ModelConfig.from_config(
        dict(config["model"], **(overrides or {})),
        vocab_size=tokenizer.vocab_size,
    )
  except (ValueError, TypeError) as e:
    raise InputError(f"--set: {e}") from None
  cfg = dataclasses.replace(
      cfg,
      scan_layers=False,
      remat=False,
      attention="einsum",
      matching_heads=cfg.matching_heads or "itc" in _objectives(config),
  )
  answers = (
      read_answers(directory, config, tokenizer, cfg) if kind == "vqa" else None
  )
  source, step = restore_params(directory)
  model = _build(kind, cfg, answers, nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  loaded, report = pretrained.match(
      nnx.to_pure_dict(state), source, config["model"], cfg
  )
  if report["new"] or report["interpolated"]:
    missing = report["new"] + report["interpolated"]
    raise InputError(
        f"--workdir {directory}: checkpoint {step} does not "
        f"hold {missing[0][0]} {missing[0][1]} (and "
        f"{len(missing) - 1} more) of its {kind} model"
    )
  nnx.replace_by_pure_dict(
      state, _nest({p: jax.numpy.asarray(v) for p, v in loaded.items()})
  )
  nnx.update(model, state)
  return Workdir(
      path=directory,
      kind=kind,
      config=config,
      model_cfg=cfg,
      model=model,
      tokenizer=tokenizer,
      step=int(step),
      answers=answers,
  )


def check_file(path: str, flag: str = "--image") -> None:
  """A one-line error now, before a model is loaded, if `path` is not a
  file."""
  if not storage.isfile(path):  # local or gs://
    raise InputError(f"{flag} {path}: no such file")


def read_image(path: str, size: int) -> np.ndarray:
  """An image file -> float32 [size, size, 3] in [-1, 1] (the whole image
  resized, as evaluation reads it)."""
  check_file(path)
  try:
    return finetune_data.read_image(path, size)
  except ValueError as e:
    raise InputError(str(e).splitlines()[0]) from None


def list_images(folder: str) -> list[str]:
  """The image files directly in `folder`, sorted by name."""
  if not storage.isdir(folder):  # local or gs://
    raise InputError(f"--images {folder}: no such directory")
  paths = sorted(
      storage.join(folder, n)
      for n in storage.listdir(folder)
      if n.lower().endswith(IMAGE_SUFFIXES)
  )
  if not paths:
    raise InputError(
        f"--images {folder} holds no image file "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )
  return paths


def encode_text(
    tokenizer: Tokenizer, text: str, max_len: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Text with optional [MASK] words -> model input.

  "[MASK]" stands for one token (a word of the EVE-Shapes vocabulary is
  one token); the rest is tokenized as training tokenizes captions.

  Returns:
    ids int32 [max_len] ([CLS] first, padded), valid bool [max_len], and
    the positions of the [MASK] tokens.
  """
  ids = [tokenizer.cls_id]
  masks = []
  for i, part in enumerate(text.split(MASK)):
    if i:
      masks.append(len(ids))
      ids.append(tokenizer.mask_id)
    if part.strip():
      ids.extend(tokenizer.encode(part.strip()))
  if len(ids) > max_len:
    raise InputError(
        f"--text is {len(ids) - 1} tokens; this model reads at "
        f"most {max_len - 1}"
    )
  out = np.full((max_len,), tokenizer.pad_id, np.int32)
  out[: len(ids)] = ids
  return out, np.arange(max_len) < len(ids), masks


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one `eve_jax: error:` line, exit 1."""

  def error(self, message):
    raise InputError(f"{self.prog}: {message}")


def cli_main(
    run: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None
) -> None:
  """Runs a command; InputError / ValueError / OSError -> one line on
  stderr and exit status 1 (never a traceback)."""
  # Library chatter (orbax's notes on checkpoint metadata) is not output.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    run(sys.argv[1:] if argv is None else argv)
  except (ValueError, OSError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f"eve_jax: error: {msg}", file=sys.stderr)
    sys.exit(1)
  finally:
    absl_logger.setLevel(level)
