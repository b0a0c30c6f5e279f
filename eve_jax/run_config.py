"""DIR/config.json: the resolved config of a run, checked when it resumes.

A workdir belongs to one run. Resuming it with a config that trains
something else (another model, objective, optimizer, data or seed) would
silently mix two experiments in one set of checkpoints and metrics, so it is
refused with one line naming the first differences, unless
`--config.train.allow_config_change` says it is meant; then the old config
is kept as DIR/config.step{N}.json and the new one written.

Keys that do not change what is computed (how often to log, evaluate and
save, the mesh, speed knobs whose outputs agree up to rounding) may change
freely, and so may the run length (`train.steps` / `train.epochs`: a warning,
since the learning-rate schedule then differs from that step on). Keys that
only one of the two configs has (a newer eve_jax added them) are not
compared.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import logging

from eve_jax import storage

# Dotted keys, or prefixes ending in ".", that may differ on resume.
FREE = (
    "mesh.",
    "axis_rules.",
    "data.num_threads",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_examples",
    "train.eval_batch_size",
    "train.viz",
    "train.max_bad_steps",
    "train.allow_config_change",
    "train.step_timeout_s",
    "train.grad_accum_steps",
    "model.remat",
    "model.attention",
    "model.moe_dispatch",
    "model.moe_experts",
    "model.moe_grouped_matmul",
)
# May differ, with a warning.
LENGTH = ("train.steps", "train.epochs")


class ConfigChangeError(ValueError):
  """Resuming a workdir with another config; the message is one line."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
  *parents, last = key.split(".")
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[last] = value


# A FREE key whose change between these values does change what is
# trained: the dropless dispatcher keeps what a capacity drops.
NOT_FREE_BETWEEN = {"model.moe_dispatch": {"ragged"}}


def _free(key: str, old: Any = None, new: Any = None) -> bool:
  if {old, new} & NOT_FREE_BETWEEN.get(key, set()):
    return False
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def changes(
    saved: dict[str, Any], new: dict[str, Any]
) -> list[tuple[str, Any, Any]]:
  """(key, saved value, new value) for every compared key that differs,
  sorted by key; FREE keys and keys missing on either side are skipped."""
  a, b = _flat(saved), _flat(new)
  return [
      (k, a[k], b[k])
      for k in sorted(a.keys() & b.keys())
      if a[k] != b[k] and not _free(k, a[k], b[k])
  ]


def as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json holds it (JSON types)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None,
    resolved: dict[str, Any] | None = None,
) -> list[str]:
  """Compares `config` with DIR/config.json of the run being resumed.

  Every process calls it, so all refuse together; nothing is written.

  Args:
    config: this run's resolved config.
    workdir: the run directory.
    step: the checkpoint step being resumed (None: a fresh start, where an
      existing config.json is simply replaced).
    resolved: {dotted key: value} the task resolved from an empty config
      value (`Task.resolved_config`); a saved config that recorded the
      resolved value instead (runs from before config.json kept the value
      as given) matches.

  Returns:
    The keys that changed in what is trained (allowed by
    train.allow_config_change); pass them to `write`.

  Raises:
    ConfigChangeError: they changed without train.allow_config_change.
  """
  path = os.path.join(workdir, "config.json")
  if step is None or not storage.isfile(path):
    return []
  try:
    saved = json.loads(storage.read_text(path))
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
  except (OSError, ValueError) as e:
    raise ConfigChangeError(
        f"cannot read {path} of the run being resumed: " f"{e}"
    ) from None
  new = as_dict(config)
  saved_flat = _flat(saved)
  for key, value in (resolved or {}).items():
    if saved_flat.get(key) == value:
      _set(new, key, value)
  diff = changes(saved, new)
  for k, old, cur in diff:
    if k in LENGTH:
      logging.warning(
          "%s changed %r -> %r on resume at step %d: the "
          "learning-rate schedule differs from here on",
          k,
          old,
          cur,
          step,
      )
  other = [d for d in diff if d[0] not in LENGTH]
  if other and not config.train.get("allow_config_change", False):
    shown = ", ".join(f"{k}: {old!r} -> {cur!r}" for k, old, cur in other[:3])
    more = f" (and {len(other) - 3} more)" if len(other) > 3 else ""
    raise ConfigChangeError(
        f"{workdir} holds a run with another config ({shown}{more}); use a "
        "new --workdir, or --config.train.allow_config_change=True to resume "
        "it with this one"
    )
  return [k for k, _, _ in other]


def write(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None,
    changed: list[str],
) -> None:
  """Writes DIR/config.json (call on process 0, after the checkpoint was
  restored); with `changed` keys, the old one is kept as
  DIR/config.step{step}.json first."""
  path = os.path.join(workdir, "config.json")
  if changed and storage.isfile(path):
    kept = os.path.join(workdir, f"config.step{step}.json")
    storage.replace(path, kept)
    logging.warning(
        "config changed on resume at step %s (%s); the old one "
        "is kept in %s",
        step,
        ", ".join(changed),
        kept,
    )
  text = json.dumps(as_dict(config), indent=1, sort_keys=True)
  if storage.is_gcs(path):  # one upload: atomic by itself
    storage.write_text(path, text)
    return
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
