"""The task contract (eve_jax/tasks/contract.py) and its registry.

A task written outside eve_jax (tests/toy_task: one file for the task, one
for its config, nothing in eve_jax touched) trains through
`python -m eve_jax.main`; every registered task has every method the
trainer calls; a bad `config.task` is one line.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest

from eve_jax import run_config
from eve_jax.tasks import contract, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "tests", "toy_task")


def _contract_methods() -> set[str]:
  return {
      n
      for n, v in vars(contract.Task).items()
      if not n.startswith("_") and (callable(v) or isinstance(v, classmethod))
  }


def test_the_contract_names_what_the_trainer_calls():
  """The trainer, the compile command and inference call these; the
  Protocol must declare each (a method dropped from it fails here)."""
  assert {
      "check",
      "setup",
      "for_compile",
      "inference_model",
      "build_model",
      "batch_spec",
      "loss",
      "optimizer",
      "analytic_flops_per_sample",
      "train_batches",
      "initial_state",
      "evaluator",
      "run_info",
      "log_extra",
      "resolved_config",
  } == _contract_methods()


@pytest.mark.parametrize(
    "name", sorted(registry.TASKS) + ["shapes_match:ShapesMatch"]
)
def test_every_task_implements_the_contract(name, monkeypatch):
  monkeypatch.syspath_prepend(TOY)
  cls = registry.get(name)
  for method in _contract_methods():
    assert callable(getattr(cls, method, None)), f"{name} lacks {method}"
  for method in ("check", "setup", "for_compile", "inference_model"):
    assert isinstance(
        inspect.getattr_static(cls, method), classmethod
    ), f"{name}.{method} is not a classmethod"


@pytest.mark.parametrize(
    "name, says",
    [
        ("pretrian", "is not one of ['nlvr2', 'pretrain', 'retrieval', 'vqa']"),
        ("no_such_module:Task", "cannot import no_such_module:Task"),
        ("eve_jax.train:NoSuchTask", "cannot import eve_jax.train:NoSuchTask"),
    ],
)
def test_an_unknown_task_is_one_line(name, says):
  with pytest.raises(ValueError, match=None) as e:
    registry.get(name)
  assert says in str(e.value) and "\n" not in str(e.value)


def test_a_task_from_outside_trains_through_main(tmp_path):
  """tests/toy_task/shapes_match.py + config.py: 20 steps, a checkpoint,
  its own eval.json key, its own head in the checkpoint."""
  wd = str(tmp_path / "w")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([TOY, env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.main",
          "--config=tests/toy_task/config.py",
          f"--workdir={wd}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [10, 20]
  assert all(0.0 <= r["match_acc"] <= 1.0 and r["match_loss"] > 0 for r in rows)
  with open(os.path.join(wd, "eval.json")) as f:
    ev = json.load(f)
  assert ev["step"] == 20 and 0.0 <= ev["match_acc"] <= 1.0
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["task"] == "shapes_match:ShapesMatch"
  assert os.path.isdir(os.path.join(wd, "checkpoints", "20"))
  from eve_jax import pretrained  # pylint: disable=g-import-not-at-top

  params, step = pretrained.load_params(wd)
  assert step == 20 and {"backbone", "head"} <= set(params)


def test_a_resolved_value_in_an_old_config_is_the_same_run(tmp_path):
  """Fine-tuning on EVE-Shapes once recorded the data folder it resolved
  (`data.dir`) in config.json; now the config keeps "" as given. Resuming
  such a run compares equal only where the task resolves that same value."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      {"data": {"dir": ""}, "seed": 0, "train": {}}
  )
  saved = {
      "data": {"dir": str(tmp_path / "shapes_tasks" / "vqa")},
      "seed": 0,
      "train": {},
  }
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  resolved = {"data.dir": saved["data"]["dir"]}
  assert run_config.check(config, str(tmp_path), 10, resolved) == []
  with pytest.raises(run_config.ConfigChangeError, match="data.dir"):
    run_config.check(config, str(tmp_path), 10, {"data.dir": "/elsewhere/vqa"})
  with pytest.raises(run_config.ConfigChangeError, match="data.dir"):
    run_config.check(config, str(tmp_path), 10)
