"""Orbax checkpoints of the train state and the data iterator, in DIR/checkpoints.

One checkpoint = {"state": the TrainState pytree, "data": the grain iterator
state (JSON)}. Saving is asynchronous (training continues while the arrays
are written); orbax writes into a temporary folder and renames it at the
end, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps, keeps the last `keep`, restores the latest."""

  def __init__(self, workdir: str, *, every: int, keep: int):
    self.every = every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, save_interval_steps=1),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state: Any, data_state: Any) -> None:
    """Starts an asynchronous save of `state` and the iterator state."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores (state, data_state) at `step` into `abstract_state`'s layout.

    Args:
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) as
        produced by `jax.eval_shape` of the init function.
    """
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this model "
          f"config: {first[:300]}") from None
    return out.state, out.data

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
