"""config.task -> the class that implements it (eve_jax/tasks/contract.py).

The one place that maps task names to code: the trainer, `compile`,
`inference`/`predict` and `main` ask here. A task outside eve_jax needs no
entry: `config.task = "package.module:ClassName"` imports it.
"""

from __future__ import annotations

import importlib

# name -> "module:class"; imported on first use, so `--help` and config
# errors do not pay for every task's imports.
TASKS = {
    "pretrain": "eve_jax.train:Pretraining",
    "vqa": "eve_jax.tasks.vqa:VQATask",
    "nlvr2": "eve_jax.tasks.nlvr2:NLVR2Task",
    "retrieval": "eve_jax.tasks.retrieval:RetrievalTask",
}


def get(name: str):
  """The task class `name` means: a key of TASKS or "module:Class".

  Raises:
    ValueError: one line naming the known tasks.
  """
  path = TASKS.get(name, name)
  module, sep, attr = str(path).partition(":")
  if not sep or not module or not attr:
    raise ValueError(
        f"config.task={name!r} is not one of {sorted(TASKS)} "
        "nor a 'package.module:Class' path"
    )
  try:
    cls = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(
        f"config.task={name!r}: cannot import {path} "
        f"({str(e).splitlines()[0]})"
    ) from None
  return cls
