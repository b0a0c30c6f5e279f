"""Hangs and lost hosts: the step watchdog, committed checkpoints, and two
real jax.distributed processes on localhost of which one dies or hangs."""

import io
import os
import time

import pytest

from eve_jax import watchdog as wd


def _wait(cond, timeout=10.0):
  t0 = time.monotonic()
  while not cond() and time.monotonic() - t0 < timeout:
    time.sleep(0.01)
  return cond()


def test_watchdog_fires_on_a_hung_step_with_stacks_and_one_line(tmp_path):
  exits, out = [], io.StringIO()
  (tmp_path / "checkpoints" / "20").mkdir(parents=True)
  (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000").mkdir()
  dog = wd.Watchdog(0.3, str(tmp_path), 1, exit_fn=exits.append, stream=out)
  with dog:
    for step in range(1, 6):  # steps that finish: no alarm
      time.sleep(0.05)
      dog.beat(step)
    assert not exits
    with dog.paused():  # an evaluation longer than the timeout: no alarm
      time.sleep(0.6)
    assert not exits
    t0 = time.monotonic()
    assert _wait(lambda: exits, 5.0)  # step 6 never finishes
    waited = time.monotonic() - t0
  assert exits == [wd.EXIT_HUNG] and 0.3 <= waited < 1.5
  line = out.getvalue()
  assert line.count("\n") == 1 and line.startswith("eve_jax: error: process 1")
  assert "after step 5" in line and "train.step_timeout_s=0.3" in line
  # The temporary directory a dead writer left is not a checkpoint.
  assert "resumes from step 20" in line
  stacks = (tmp_path / "stacks.process1.txt").read_text()
  assert "test_watchdog_fires_on_a_hung_step" in stacks  # the main thread


def test_watchdog_automatic_limit_and_off(tmp_path):
  dog = wd.Watchdog(-1, str(tmp_path))
  assert dog.limit() == wd.AUTO_FLOOR_S  # nothing measured yet
  dog._per_step, dog._steps_per_beat = [100.0, 120.0, 90.0], 1
  assert dog.limit() == pytest.approx(1000.0)  # 10 x the median step
  dog._steps_per_beat = 20  # a beat every 20 steps of 100 s
  assert dog.limit() == pytest.approx(20_000.0)
  off = wd.Watchdog(0, str(tmp_path))
  with off:
    assert off._thread is None


def test_committed_steps(tmp_path):
  assert wd.committed_steps(str(tmp_path)) == []
  assert "starts over" in wd.resume_note(str(tmp_path))
  for name in ("10", "30", "40.orbax-checkpoint-tmp-5", "notes"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert wd.committed_steps(str(tmp_path)) == [10, 30]


# --- two real processes (jax.distributed on localhost) ----------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, out_prefix, *, steps=40, env_extra=None, drivers=None):
  """Both processes of a tiny data=2 x expert=2 run (2 CPU devices each).

  `drivers` maps a process index to the script that runs it instead of
  `-m eve_jax.main` (e.g. tests/crash_driver.py, which takes the same
  flags)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      **(env_extra or {}),
  )
  port = _free_port()
  args = [
      "--config=configs/base.py:tiny",
      f"--workdir={workdir}",
      "--config.mesh.data=2",
      "--config.mesh.expert=2",
      "--config.data.num_tokenizer_captions=500",
      f"--config.train.steps={steps}",
      "--config.train.batch_size=8",
      "--config.train.log_every=1",
      "--config.train.eval_every=0",
      "--config.train.checkpoint_every=10",
      "--config.train.eval_examples=8",
      "--config.train.eval_batch_size=8",
      "--config.train.step_timeout_s=20",
      "--heartbeat_timeout_s=5",
      f"--coordinator=127.0.0.1:{port}",
      "--num_processes=2",
  ]
  drivers = drivers or {}
  return [
      subprocess.Popen(
          [
              sys.executable,
              *drivers.get(i, ["-m", "eve_jax.main"]),
              *args,
              f"--process_id={i}",
          ],
          cwd=REPO,
          env=env,
          stdout=open(f"{out_prefix}{i}.log", "w"),
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]


def _wait_all(procs, timeout):
  t0 = time.monotonic()
  try:
    while time.monotonic() - t0 < timeout:
      if all(p.poll() is not None for p in procs):
        return [p.returncode for p in procs]
      time.sleep(0.1)
    return None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _wait_for_rows(workdir, rows, timeout=300):
  """Until DIR/metrics.jsonl has `rows` lines (steps logged) or timeout."""
  metrics = workdir / "metrics.jsonl"
  _wait(
      lambda: metrics.exists()
      and len(metrics.read_text().splitlines()) >= rows,
      timeout,
  )


@pytest.mark.slow  # ~1.5 min: two processes start, train, one hangs
def test_a_hung_process_trips_the_watchdog_on_both(tmp_path):
  """Process 1 blocks before step 12 (the test hook): process 0 waits in
  that step's collective. Both watchdogs fire after the 20 s timeout:
  stacks files, one line each naming step 11 and the checkpoint (10) a
  restart resumes from, exit status 75; nothing hangs."""
  from eve_jax import loop  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "w"
  procs = _start(
      workdir, str(tmp_path / "out"), env_extra={loop.HANG_ENV: "1:12"}
  )
  codes = _wait_all(procs, 400)
  assert codes == [wd.EXIT_HUNG, wd.EXIT_HUNG], codes
  for i in range(2):
    log = (tmp_path / f"out{i}.log").read_text()
    lines = [x for x in log.splitlines() if x.startswith("eve_jax: error")]
    assert len(lines) == 1, log[-2000:]
    assert f"process {i}: no training step finished" in lines[0]
    assert "after step 11" in lines[0] and "resumes from step 10" in lines[0]
    assert (workdir / f"stacks.process{i}.txt").stat().st_size > 0


@pytest.mark.slow  # ~1.5 min
def test_a_killed_process_ends_the_other_within_the_heartbeat(tmp_path):
  """SIGKILL process 1 mid-run: process 0 ends non-zero within
  --heartbeat_timeout_s (5 s) plus a margin, whichever of gloo (a failed
  collective: our one line) or JAX's coordinator (its own fatal line)
  notices first; no hang. The checkpoints left are committed ones."""
  import random  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "w"
  procs = _start(workdir, str(tmp_path / "out"))
  kill_at = random.Random().randint(12, 25)
  _wait_for_rows(workdir, kill_at)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  codes = _wait_all(procs, 60)
  took = time.monotonic() - killed
  assert codes is not None and codes[0] != 0, codes
  assert took < 5 + 10, took
  log = (tmp_path / "out0.log").read_text()
  assert (
      "a peer process is most likely lost" in log or "another task died" in log
  ), log[-2000:]
  assert wd.committed_steps(str(workdir))[-1] >= 10
  print(
      f"\nkilled at step ~{kill_at}: process 0 exited {codes[0]} "
      f"{took:.1f} s later"
  )


def _losses(workdir):
  """[(step, loss)] of every row of metrics.jsonl, repeated steps included."""
  import json  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.slow  # ~4 min: three two-process runs
def test_killed_in_a_checkpoint_write_then_restarted_is_the_run_that_never_died(
    tmp_path,
):
  """Process 1 SIGKILLs itself right after its step-20 checkpoint write has
  started (tests/crash_driver.py): process 0 ends non-zero within the
  heartbeat bound, step 20 is never committed (orbax commits a step only
  when every process has written it). Both restarted with the same command
  (a new coordinator port, as a launcher gives): every logged loss,
  repeated steps included, equals the uninterrupted two-process run's, and
  the final parameters are bitwise equal."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from eve_jax import pretrained  # pylint: disable=g-import-not-at-top
  # One compilation per program for all six processes.
  cache = dict(
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  ref, work = tmp_path / "ref", tmp_path / "w"
  codes = _wait_all(
      _start(ref, str(tmp_path / "ref"), steps=30, env_extra=cache), 400
  )
  assert codes == [0, 0], (tmp_path / "ref0.log").read_text()[-2000:]
  reference = dict(_losses(ref))
  assert sorted(reference) == list(range(1, 31))

  procs = _start(
      work,
      str(tmp_path / "kill"),
      steps=30,
      env_extra=cache,
      drivers={1: ["tests/crash_driver.py", "20"]},
  )
  t0 = time.monotonic()
  while procs[1].poll() is None and time.monotonic() - t0 < 400:
    time.sleep(0.05)
  killed = time.monotonic()
  codes = _wait_all(procs, 60)
  took = time.monotonic() - killed
  assert codes is not None and codes[1] == -9 and codes[0] != 0, codes
  assert took < 5 + 10, took
  assert wd.committed_steps(str(work)) == [10], os.listdir(work / "checkpoints")
  print(
      f"\nprocess 1 killed in its step-20 write: process 0 exited "
      f"{codes[0]} {took:.1f} s later"
  )

  codes = _wait_all(
      _start(work, str(tmp_path / "restart"), steps=30, env_extra=cache), 400
  )
  assert codes == [0, 0], (tmp_path / "restart0.log").read_text()[-2000:]
  rows = _losses(work)
  assert {s for s, _ in rows} == set(range(1, 31))
  assert len(rows) > 30  # steps 11-20 ran twice
  for step, loss in rows:
    assert loss == reference[step], step
  pa, sa = pretrained.load_params(str(ref))
  pb, sb = pretrained.load_params(str(work))
  assert sa == sb == 30
  flat_a, flat_b = (dict(pretrained._flatten(p)) for p in (pa, pb))  # pylint: disable=protected-access
  assert flat_a.keys() == flat_b.keys() and len(flat_a) > 50
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))


@pytest.mark.slow  # ~1.5 min
def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path):
  """A maintenance event on one host: SIGTERM to process 1 only. The
  processes agree at the next log step (every step here), both save that
  same step and exit 0."""
  import random  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "w"
  procs = _start(workdir, str(tmp_path / "out"), steps=200)
  signal_at = random.Random().randint(12, 25)
  _wait_for_rows(workdir, signal_at)
  procs[1].send_signal(signal.SIGTERM)
  codes = _wait_all(procs, 120)
  assert codes == [0, 0], (tmp_path / "out1.log").read_text()[-2000:]
  last = _losses(workdir)[-1][0]
  assert signal_at <= last < 200
  assert wd.committed_steps(str(workdir))[-1] == last
  assert "received SIGTERM" in (tmp_path / "out1.log").read_text()
  assert f"stopped at step {last}" in (tmp_path / "out0.log").read_text()
  print(
      f"\nSIGTERM to process 1 after step ~{signal_at}: both saved step "
      f"{last} and exited 0"
  )
