"""Runs a table's rows, resumably, and collects each row x seed's numbers.

Layout under --workdir:

  runs/<row key>/seed<s>/{pretrain,vqa,nlvr2,retrieval}/  eve_jax.main workdirs
  runs/<row key>/seed<s>/<stage>.log                      each stage's output
  runs/<row key>/seed<s>/<stage>/ablate_done.json         stage finished
  runs/<row key>/seed<s>/result.json                      the row x seed
  shapes_tasks/seed<s>/                                   EVE-Shapes task files
  table<N>.md, table<N>.json                              the report

A finished stage (its `ablate_done.json`) is never run again and a stage
cut short resumes from its last checkpoint (eve_jax.main does that), so a
table can span sessions: rerun the same command.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import threading
import time
from typing import Callable

from eve_jax.ablate import baselines
from eve_jax.ablate import schedule as sched
from eve_jax.ablate.tables import COLUMNS, EXTRA, Row, Table

DONE = "ablate_done.json"


class StageError(RuntimeError):
  """A stage's `eve_jax.main` failed; the message names its log."""


_SHAPES_LOCK = threading.Lock()  # rows of one seed share its task files


def _call(cmd: list[str], out) -> tuple[int, float]:
  """Runs cmd; (exit code, its CPU seconds, user + system). The child's
  own rusage (os.wait4), so rows running side by side are not mixed."""
  proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_utime + usage.ru_stime


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def run_stage(
    stage: str,
    row: Row,
    seed: int,
    seed_dir: str,
    steps: int,
    schedule: sched.Schedule,
    log: Callable[[str], None],
) -> dict:
  """Runs one stage unless done; returns its ablate_done.json."""
  workdir = os.path.join(seed_dir, stage)
  done = _read_json(os.path.join(workdir, DONE))
  if done is not None:
    return done
  os.makedirs(workdir, exist_ok=True)
  shapes_dir = None
  if stage != "pretrain":
    root = os.path.dirname(os.path.dirname(os.path.dirname(seed_dir)))
    with _SHAPES_LOCK:
      shapes_dir = sched.write_shapes_tasks(
          os.path.join(root, "shapes_tasks"), seed
      )
  cmd = sched.command(stage, row, seed, workdir, steps, schedule, shapes_dir)
  log_path = os.path.join(seed_dir, f"{stage}.log")
  t0 = time.perf_counter()
  with open(log_path, "a") as out:
    out.write(" ".join(cmd) + "\n")
    out.flush()
    rc, cpu = _call(cmd, out)
  wall = time.perf_counter() - t0
  evaluation = _read_json(os.path.join(workdir, "eval.json"))
  if rc != 0 or evaluation is None or evaluation.get("step") != steps:
    with open(log_path) as f:
      tail = [l.strip() for l in f if l.strip()][-1:]
    raise StageError(
        f"{stage} of row {row.name!r} seed {seed} failed (exit {rc}): "
        f"{tail[0] if tail else ''} [log: {log_path}]"
    )
  done = dict(steps=steps, wall_s=wall, cpu_s=cpu, eval=evaluation)
  _write_json(os.path.join(workdir, DONE), done)
  log(f"  {stage}: {steps} steps, {wall:.0f} s wall, {cpu:.0f} s CPU")
  return done


def run_row(
    table: Table,
    row: Row,
    seed: int,
    workdir: str,
    schedule: sched.Schedule,
    log: Callable[[str], None] = print,
) -> dict:
  """Pretrains and fine-tunes one row x seed (what is not done yet) and
  writes its result.json: the COLUMNS and EXTRA numbers, routing health,
  times."""
  seed_dir = os.path.join(workdir, "runs", row.key, f"seed{seed}")
  result_path = os.path.join(seed_dir, "result.json")
  result = _read_json(result_path)
  if result is not None:
    return result
  log(f"table {table.number}, {row.name!r}, seed {seed} ({seed_dir})")
  reference = table.row(row.same_flops_as) if row.same_flops_as else None
  stages = {}
  for stage in sched.STAGES:
    steps = (
        sched.pretrain_steps(row, schedule, reference)
        if stage == "pretrain"
        else schedule.steps(stage)
    )
    stages[stage] = run_stage(stage, row, seed, seed_dir, steps, schedule, log)
  numbers = {}
  for name, stage, key in COLUMNS + EXTRA:
    value = stages[stage]["eval"].get(key)
    numbers[name] = None if value is None else float(value)
  pre = stages["pretrain"]["eval"]
  result = dict(
      row=row.name,
      overrides=[list(kv) for kv in row.overrides],
      seed=seed,
      numbers=numbers,
      routing={
          k: v
          for k, v in pre.items()
          if k.startswith("routing/") and "/expert" not in k
      },
      steps={s: stages[s]["steps"] for s in sched.STAGES},
      cpu_s=sum(stages[s]["cpu_s"] for s in sched.STAGES),
      wall_s=sum(stages[s]["wall_s"] for s in sched.STAGES),
  )
  _write_json(result_path, result)
  return result


def run_table(
    table: Table,
    seeds: list[int],
    workdir: str,
    schedule: sched.Schedule,
    rows: list[str] | None = None,
    log: Callable[[str], None] = print,
    parallel: int = 1,
) -> dict[str, list[dict]]:
  """Every (chosen) row x seed, seed-major (all rows of seed 0 first, so a
  table has one seed of every row before a second), `parallel` at a time
  (a tiny run keeps about one core busy); {row name: results}."""
  chosen = [table.row(r) for r in rows] if rows else list(table.rows)
  jobs = [(row, seed) for seed in seeds for row in chosen]
  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    futures = [
        pool.submit(run_row, table, row, seed, workdir, schedule, log)
        for row, seed in jobs
    ]
    results = [f.result() for f in futures]  # the first failure raises
  out = {r.name: [] for r in chosen}
  for (row, _), result in zip(jobs, results):
    out[row.name].append(result)
  return out


def blind(seeds: list[int], workdir: str) -> dict[int, dict[str, float]]:
  """baselines.blind_numbers of each seed whose task files are written."""
  out = {}
  for seed in seeds:
    shapes = os.path.join(workdir, "shapes_tasks", f"seed{seed}")
    if os.path.exists(os.path.join(shapes, "written")):
      out[seed] = baselines.blind_numbers(shapes)
  return out


def collect(table: Table, seeds: list[int], workdir: str) -> dict[str, list]:
  """The result.json files that exist for the table's rows (for a report of
  what is done so far)."""
  out = {}
  for row in table.rows:
    found = []
    for seed in seeds:
      r = _read_json(
          os.path.join(workdir, "runs", row.key, f"seed{seed}", "result.json")
      )
      if r is not None:
        found.append(r)
    out[row.name] = found
  return out
