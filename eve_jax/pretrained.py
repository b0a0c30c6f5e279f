"""Starting a model from pretrained weights (`--config.init_from=DIR`).

DIR is a pretraining workdir (what `python -m eve_jax.main` writes:
config.json, tokenizer.model, checkpoints/) or a converted checkpoint laid
out the same way (its checkpoint's state holds only "params"). The newest
checkpoint's parameters are matched by name against the new model's:

  - same path, same shape: loaded;
  - image position embeddings of another resolution: the patch grid is
    resized (bicubic), CLS kept: a 224 px model fine-tunes at 384 or 480;
  - scanned vs unrolled hard-router blocks: converted (`eve.scan_layout`);
  - in the new model only (task heads): left as initialized ("new");
  - in the checkpoint only (MLM head, MIM decoder): "dropped";
  - same path, another shape: an error naming the parameter and both shapes.

What happened to each parameter is returned as a report (and written to
DIR/init_report.json by the caller).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eve_jax import storage
from eve_jax.model import eve
from eve_jax.watchdog import committed_in
from eve_jax.model.variants import ModelConfig

_POS = ("backbone", "image_embed", "pos_embed")


class InitError(ValueError):
  """A checkpoint that cannot start this model; the message is one line."""


def _pure(tree: Any) -> Any:
  """Orbax's raw restore -> nnx.to_pure_dict's form: {'value': x} leaves
  unwrapped, list indices back to ints."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return _pure(tree["value"])
    return {
        (int(k) if isinstance(k, str) and k.isdigit() else k): _pure(v)
        for k, v in tree.items()
    }
  return tree


def read_config(directory: str) -> dict[str, Any]:
  if directory.strip() in ("''", '""'):  # the shell kept the quotes
    raise InitError(
        f"config.init_from={directory} is not empty: pass "
        "--config.init_from= to train from scratch"
    )
  try:
    storage.check_dir(directory, "config.init_from")
  except storage.StorageError as e:
    raise InitError(str(e)) from None
  path = os.path.join(directory, "config.json")
  if not storage.isfile(path):
    raise InitError(
        f"config.init_from={directory} has no config.json: not "
        "a pretraining workdir or converted checkpoint"
    )
  try:
    saved = json.loads(storage.read_text(path))
  except ValueError as e:
    raise InitError(f"cannot read {path}: {e}") from None
  if not isinstance(saved, dict):
    raise InitError(f"{path} holds no JSON object")
  return saved


def tokenizer_path(directory: str) -> str:
  """DIR/tokenizer.model (SentencePiece), else DIR/tokenizer.json (a Hugging
  Face tokenizer, as `python -m eve_jax.convert eve` writes)."""
  for name in ("tokenizer.model", "tokenizer.json"):
    path = os.path.join(directory, name)
    if storage.isfile(path):
      return path
  raise InitError(
      f"config.init_from={directory} has no tokenizer.model or "
      "tokenizer.json"
  )


class _DropStepMetadataWarning(logging.Filter):
  """orbax looks for the step's _CHECKPOINT_METADATA in the item folder it
  is given (checkpoints/N/state) and warns on every load; the file is one
  folder up, and nothing here needs it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_step_metadata():
  log = logging.getLogger("absl")
  f = _DropStepMetadataWarning()
  log.addFilter(f)
  try:
    yield
  finally:
    log.removeFilter(f)


def load_params(
    directory: str, flag: str = "config.init_from"
) -> tuple[dict[str, Any], int]:
  """(the newest checkpoint's parameters as a nested dict, its step).

  Parameters only (no optimizer moments), onto this process's first
  device, whatever mesh the run saved them from: a run on 8 devices starts
  one on 1. `flag` names the directory's origin in errors.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.join(storage.absolute(directory), "checkpoints")
  if not storage.isdir(ckpt_dir):
    raise InitError(f"{flag}={directory} has no checkpoints/")
  # Committed steps only (locally a plain step folder, an interrupted write
  # is still named N.orbax-checkpoint-tmp-*; on GCS a step folder with its
  # commit marker).
  steps = [
      s
      for s in committed_in(ckpt_dir)
      if storage.isdir(os.path.join(ckpt_dir, str(s), "state"))
  ]
  if not steps:
    raise InitError(
        f"{flag}={directory}: checkpoints/ holds no finished " "checkpoint"
    )
  step = steps[-1]
  path = os.path.join(ckpt_dir, str(step), "state")
  with _quiet_step_metadata(), ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if "params" not in tree:
      raise InitError(f"{flag}={directory}: checkpoint {step} has no params")
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "params": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
            tree["params"],
        )
    }
    out = reader.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            partial_restore=True,
            restore_args=jax.tree.map(
                lambda _: ocp.ArrayRestoreArgs(sharding=dev), target
            ),
        ),
    )
  return _pure(out["params"]), step


def interpolate_positions(pos: np.ndarray, num_patches: int) -> np.ndarray:
  """[1 + g*g, D] -> [1 + num_patches, D]: the g x g grid resized bicubically
  to the new grid (square), the CLS row kept."""
  g, g_new = int(round((pos.shape[0] - 1) ** 0.5)), int(round(num_patches**0.5))
  if g * g != pos.shape[0] - 1 or g_new * g_new != num_patches:
    raise InitError(
        f"image position embeddings {pos.shape} do not form a "
        f"square grid to resize to {num_patches} patches"
    )
  grid = jnp.asarray(pos[1:], jnp.float32).reshape(g, g, -1)
  grid = jax.image.resize(grid, (g_new, g_new, grid.shape[-1]), "bicubic")
  return np.concatenate(
      [
          np.asarray(pos[:1], np.float32),
          np.asarray(grid).reshape(num_patches, -1),
      ]
  )


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _path(p) -> str:
  return "/".join(str(k) for k in p)


def match(
    target: dict[str, Any],
    source: dict[str, Any],
    source_model: dict[str, Any],
    target_cfg: ModelConfig,
) -> tuple[dict[tuple, np.ndarray], dict[str, list]]:
  """Which checkpoint arrays go where in the new model.

  Args:
    target: the new model's parameters (nnx.to_pure_dict; arrays or
      ShapeDtypeStructs).
    source: the checkpoint's parameters (`load_params`).
    source_model: the checkpoint's config.json "model" block.
    target_cfg: the new model's config.

  Returns:
    ({target path: array to load}, report {"loaded", "interpolated", "new",
    "dropped": [[path, shape], ...]}).
  """
  source = dict(source)
  if "backbone" in source and "backbone" in target:
    src_scanned = "scanned" in source["backbone"]
    tgt_scanned = "scanned" in target["backbone"]
    src_cfg = ModelConfig(
        **{
            k: v
            for k, v in source_model.items()
            if k in ModelConfig.__dataclass_fields__
        }
    )
    if src_scanned and not tgt_scanned:
      source["backbone"] = eve.unscan_layout(source["backbone"], src_cfg)
    elif tgt_scanned and not src_scanned:
      source["backbone"] = eve.scan_layout(source["backbone"], src_cfg)
  src = dict(_flatten(source))
  out, report = {}, {"loaded": [], "interpolated": [], "new": [], "dropped": []}
  for path, leaf in _flatten(target):
    shape = tuple(leaf.shape)
    if path not in src:
      report["new"].append([_path(path), list(shape)])
      continue
    value = np.asarray(src.pop(path))
    if value.shape != shape:
      if path == _POS and value.shape[1:] == shape[1:]:
        value = interpolate_positions(value, target_cfg.num_patches)
        report["interpolated"].append([_path(path), list(value.shape)])
      else:
        raise InitError(
            f"parameter {_path(path)} is {list(value.shape)} in "
            f"the checkpoint but {list(shape)} in this model "
            "(another variant or vocabulary?)"
        )
    else:
      report["loaded"].append([_path(path), list(shape)])
    out[path] = value
  report["dropped"] = [[_path(p), list(np.shape(v))] for p, v in src.items()]
  return out, report


def summary(report: dict[str, list]) -> str:
  """One line: how many parameters (and arrays) were loaded, new, dropped."""

  def n(key):
    return sum(int(np.prod(s)) for _, s in report[key])

  return (
      f"{len(report['loaded'])} arrays loaded ({n('loaded'):,} "
      f"parameters), {len(report['interpolated'])} interpolated, "
      f"{len(report['new'])} new ({n('new'):,}), "
      f"{len(report['dropped'])} dropped ({n('dropped'):,})"
  )
