"""Orbax checkpoints of the train state and the data iterator, in DIR/checkpoints.

One checkpoint = {"state": the TrainState pytree, "data": the grain iterator
state (JSON)}. Saving is asynchronous (training continues while the arrays
are written). How a step is committed is orbax's choice by path (its
`atomicity_defaults`): on a local disk it writes into a temporary folder
and renames it to the step number at the end; in a `gs://` workdir, where a
rename is a copy of every object, it writes the step's objects in place and
commits with a `commit_success.txt` marker object, written last, after
every process is done. Either way a run killed mid-write leaves the
previous checkpoint intact, and a step without its commit is never listed
or restored (orbax removes it before writing that step again).

A local checkpoint directory reached through a gcsfuse mount gets the
rename commit, which gcsfuse does not do atomically: write checkpoints to
`gs://` directly, not through a mount.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from eve_jax import storage


def _names(tree: Any) -> list[tuple[str, Any]]:
  """Leaves with dotted names ("params.backbone.norm.scale"), as orbax
  names them with nnx Variables' trailing ".value" dropped."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [
        str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
        for k in path
    ]
    if parts and parts[-1] == "value":
      parts = parts[:-1]
    out.append((".".join(parts), leaf))
  return out


class Checkpointer:
  """Saves every `every` steps, keeps the last `keep`, restores the latest."""

  def __init__(self, workdir: str, *, every: int, keep: int):
    self.every = every
    self.directory = os.path.join(storage.absolute(workdir), "checkpoints")
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, save_interval_steps=1
        ),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state: Any, data_state: Any) -> None:
    """Starts an asynchronous save of `state` and the iterator state."""
    self._mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
        ),
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores (state, data_state) at `step` into `abstract_state`'s layout.

    Args:
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) as
        produced by `jax.eval_shape` of the init function.
    """
    # Shapes first, from the metadata: a mismatch named in one line, before
    # orbax starts reading arrays it would have to abandon.
    what = self.mismatch(step, abstract_state)
    if what is not None:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match "
          f"this model config: {what[:300]}"
      )
    try:
      out = self._mngr.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore(),
          ),
      )
    except (ValueError, KeyError, TypeError) as e:
      what = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this model "
          f"config: {what[:300]}"
      ) from None
    return out.state, out.data

  def mismatch(self, step: int, abstract_state: Any) -> str | None:
    """The first array (parameters first) whose shape differs between the
    checkpoint at `step` and `abstract_state`, or that only one of them has,
    in words; None if their shapes agree."""
    path = os.path.join(self.directory, str(step), "state")
    try:
      with ocp.StandardCheckpointer() as reader:
        meta = reader.metadata(path)
    except (OSError, ValueError, KeyError, TypeError):
      return None
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    saved = {n: tuple(getattr(m, "shape", ()) or ()) for n, m in _names(meta)}
    wanted = {n: tuple(x.shape) for n, x in _names(abstract_state)}
    order = sorted(
        wanted.keys() | saved.keys(),
        key=lambda n: (not n.startswith("params."), n),
    )
    for n in order:
      if n in wanted and n in saved and wanted[n] != saved[n]:
        return (
            f"{n} is {list(saved[n])} in the checkpoint but "
            f"{list(wanted[n])} in this model"
        )
      if n not in saved:
        return f"{n} {list(wanted[n])} of this model is not in the checkpoint"
      if n not in wanted:
        return f"{n} {list(saved[n])} of the checkpoint is not in this model"
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
