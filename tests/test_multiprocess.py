"""Two local processes, one global mesh, talking through jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from eve_jax import config_lib, sharding, train
from eve_jax.checkpoint import Checkpointer
from eve_jax.data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "multiprocess_driver.py")
STEPS = 3
OVERRIDES = dict(
    steps=STEPS,
    batch_size=8,
    log_every=1,
    eval_every=0,
    checkpoint_every=STEPS,
    eval_examples=8,
    eval_batch_size=8,
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(workdir: str, out, env: dict | None = None) -> None:
  """The tiny run in 2 processes x 2 CPU devices (data=2, expert=2) through
  tests/multiprocess_driver.py, its coordinator on a free localhost port;
  each process's final state under `out`. Fails with a process's log
  unless both exit 0."""
  env = dict(
      os.environ,
      **(env or {}),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  args = [
      "--config=configs/base.py:tiny",
      f"--workdir={workdir}",
      "--config.mesh.data=2",
      "--config.mesh.expert=2",
      "--config.data.num_tokenizer_captions=500",
      *[f"--config.train.{k}={v}" for k, v in OVERRIDES.items()],
      f"--coordinator=127.0.0.1:{_free_port()}",
      "--num_processes=2",
      f"--out={out}",
  ]
  procs = [
      subprocess.Popen(
          [sys.executable, DRIVER, *args, f"--process_id={i}"],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    finally:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


def test_two_processes_train_and_checkpoint_together(tmp_path):
  """2 processes x 2 CPU devices = one 4-device mesh (data=2, expert=2):
  each process feeds its own half of every batch, only process 0 writes
  metrics, both write the checkpoint, and a single process restores exactly
  the parameters the two processes ended with."""
  workdir, out = tmp_path / "w", tmp_path / "out"
  out.mkdir()
  run_two_processes(str(workdir), out)

  data = [json.loads((out / f"data_{i}.json").read_text()) for i in range(2)]
  assert [d["shard"] for d in data] == [[0, 2], [1, 2]]
  assert all(
      d["rows"] == 4 and d["local_devices"] == 2 and d["devices"] == 4
      for d in data
  )
  # Process i reads records i::2: the two halves of a batch never overlap.
  assert all(i % 2 == 0 for i in data[0]["indices"])
  assert all(i % 2 == 1 for i in data[1]["indices"])

  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # written once

  # A single process (here: one device) restores the 2-process checkpoint.
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.train.update(OVERRIDES)
  c.mesh.data = 1
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  rules = sharding.parse_rules(c.axis_rules)
  with sharding.use(mesh, rules):
    prog = train.build_program(
        c, Tokenizer(str(workdir / "tokenizer.model")), mesh, rules
    )
    ckpt = Checkpointer(str(workdir), every=STEPS, keep=1)
    assert ckpt.latest_step() == STEPS
    state, _ = ckpt.restore(STEPS, prog.abstract)
    ckpt.close()
  want = np.load(out / "params.npz")
  got = {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(state.params)
  }
  assert sorted(got) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert int(state.step) == STEPS


def test_cluster_detection(monkeypatch):
  """SLURM is joined only inside an srun step of several tasks; a plain
  machine (this one, CI's) is not a cluster."""
  from eve_jax import main as eve_main

  for var in ("SLURM_NTASKS", "SLURM_STEP_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(eve_main.glob, "glob", lambda pattern: [])
  assert eve_main.cluster_detected() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert eve_main.cluster_detected() is None  # the sbatch script itself
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  assert eve_main.cluster_detected() == "slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert eve_main.cluster_detected() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1")
  assert eve_main.cluster_detected() == "tpu"
