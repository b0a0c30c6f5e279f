"""Writing a converted checkpoint: a directory `--config.init_from=DIR`
accepts (config.json, checkpoints/0 holding {"params": ...}, a tokenizer
when there is one) plus conversion_report.json.

The report is what `eve_jax.pretrained.match` says when the converted
parameters are loaded into the model the config describes (so it is
exactly what init_from will do), plus what the converter dropped from the
source file and why, and what it initialized itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from eve_jax import pretrained, storage
from eve_jax.convert.source import ConversionError
from eve_jax.model.eve import EVE
from eve_jax.model.task_models import NLVR2Model, RetrievalModel, VQAModel
from eve_jax.model.variants import ModelConfig


class _Backbone(nnx.Module):
  """The backbone alone, under the name every eve_jax model gives it."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.backbone = EVE(cfg, rngs=rngs)


def build(
    model_cfg: ModelConfig,
    heads: tuple[str, ...] = (),
    num_answers: int = 0,
    *,
    abstract: bool = False,
    seed: int = 0,
):
  """The eve_jax model that holds a converted checkpoint: VQAModel with a
  "vqa" head, NLVR2Model with "nlvr2", RetrievalModel with "retrieval"
  heads, else the backbone alone. `abstract`: shapes only (nnx.eval_shape), nothing allocated.
  """
  if "vqa" in heads:
    make = lambda: VQAModel(model_cfg, num_answers, rngs=nnx.Rngs(seed))
  elif "nlvr2" in heads:
    make = lambda: NLVR2Model(model_cfg, rngs=nnx.Rngs(seed))
  elif "retrieval" in heads:
    make = lambda: RetrievalModel(model_cfg, rngs=nnx.Rngs(seed))
  else:
    make = lambda: _Backbone(model_cfg, rngs=nnx.Rngs(seed))
  return nnx.eval_shape(make) if abstract else make()


def report(
    params: dict,
    model_cfg: dict[str, Any],
    pieces: dict[str, Any],
    source: str,
    heads: tuple[str, ...] = (),
    num_answers: int = 0,
) -> dict[str, Any]:
  """Loaded / new / dropped as init_from into `build(...)` will see them,
  plus the converter's own dropped and initialized lists."""
  cfg = ModelConfig.from_config(model_cfg)
  target = nnx.to_pure_dict(
      nnx.state(build(cfg, heads, num_answers, abstract=True), nnx.Param)
  )
  try:
    _, matched = pretrained.match(target, params, model_cfg, cfg)
  except pretrained.InitError as e:
    raise ConversionError(f"{source}: {e}") from None
  if matched["dropped"]:
    path, shape = matched["dropped"][0]
    raise ConversionError(
        f"{source}: converted parameter {path} {shape} "
        "has no place in the eve_jax model"
    )
  return {
      "source": os.path.abspath(source),
      "model": model_cfg,
      "loaded": matched["loaded"],
      "new": matched["new"],
      "initialized_by_converter": pieces.get("initialized", []),
      "dropped_from_source": pieces.get("dropped", []),
      "summary": pretrained.summary(
          dict(
              matched, dropped=[[k, s] for k, s, _ in pieces.get("dropped", [])]
          )
      ),
  }


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def write(
    out_dir: str,
    params: dict,
    config: dict[str, Any],
    rep: dict[str, Any],
    tokenizer_json: str | None = None,
) -> None:
  """Writes DIR: config.json, checkpoints/0, conversion_report.json and,
  given, tokenizer.json. Refuses a DIR that already has checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  out_dir = storage.absolute(out_dir)
  try:
    storage.check_dir(out_dir, "--out")
  except storage.StorageError as e:
    raise ConversionError(str(e)) from None
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if storage.isdir(ckpt_dir) and storage.listdir(ckpt_dir):
    raise ConversionError(
        f"--out {out_dir} already holds checkpoints/; "
        "choose an empty directory"
    )
  storage.makedirs(out_dir)
  mngr = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(create=True),
      item_names=("state",),
  )
  mngr.save(
      0,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": _str_keys(params)})
      ),
  )
  mngr.wait_until_finished()
  mngr.close()
  # Local or gs:// alike (eve_jax/storage.py).
  storage.write_text(
      os.path.join(out_dir, "config.json"), json.dumps(config, indent=1)
  )
  storage.write_text(
      os.path.join(out_dir, "conversion_report.json"), json.dumps(rep, indent=1)
  )
  if tokenizer_json is not None:
    storage.write_text(os.path.join(out_dir, "tokenizer.json"), tokenizer_json)


def copy_file(src: str, out_dir: str, name: str) -> None:
  storage.write_bytes(os.path.join(out_dir, name), storage.read_bytes(src))


def load(
    directory: str, seed: int = 0, overrides: dict[str, Any] | None = None
):
  """A converted (or trained) DIR -> (model with its parameters, config
  dict). The model class follows the heads config.json names; `overrides`
  change config.model keys (e.g. {"pre_norm": False} for BEiT parity).
  Parameters the checkpoint lacks keep their initialization (`seed`)."""
  config = pretrained.read_config(directory)
  model_cfg = ModelConfig.from_config(
      dict(config["model"], **(overrides or {}))
  )
  heads = tuple(config.get("heads", ()))
  args = (model_cfg, heads, config.get("vqa_answers", 0))
  model = build(*args, abstract=True, seed=seed)
  source, _ = pretrained.load_params(directory)
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loaded, rep = pretrained.match(target, source, config["model"], model_cfg)
  if rep["new"]:  # only then pay for initializing (op by op: seconds)
    model = build(*args, seed=seed)
  state = nnx.state(model, nnx.Param)
  target = nnx.to_pure_dict(state)

  def put(path, leaf):
    key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    return (
        jax.numpy.asarray(loaded[key], leaf.dtype) if key in loaded else leaf
    )  # every leaf is real when some are new

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(put, target))
  nnx.update(model, state)
  return model, config
