r"""Reproduces the paper's ablation tables at small scale.

  python -m eve_jax.ablate --table=8 --seeds=0,1 --workdir=/tmp/ablate

Pretrains each row of the table (configs/base.py:tiny with the row's
overrides, eve_jax/ablate/tables.py) on EVE-Shapes, fine-tunes it on the
EVE-Shapes VQA, NLVR2 and retrieval tasks, and writes DIR/table<N>.md and
.json: each column's mean and spread over seeds next to the paper's numbers,
and whether the paper's direction reproduced. Rerunning the command
resumes: finished stages are never redone, and rows shared by several
tables run once. --report_only rewrites the report from what is done.
"""

from __future__ import annotations

import sys

from absl import app, flags

from eve_jax.ablate import report, runner, schedule, tables

_TABLE = flags.DEFINE_string(
    "table", None, f"Comma-separated tables: {', '.join(tables.TABLES)}."
)
_SEEDS = flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where runs and reports go.")
_SCHEDULE = flags.DEFINE_string(
    "schedule", "small", f"Steps per stage: {', '.join(schedule.SCHEDULES)}."
)
_ROWS = flags.DEFINE_string(
    "rows", "", "Only these rows (names as in the table, ';'-separated)."
)
_PARALLEL = flags.DEFINE_integer(
    "parallel",
    1,
    "Rows run side by side (a tiny run keeps about one CPU core busy: "
    "2 on a 2-core machine).",
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Write the reports from finished rows; run nothing."
)


def _fail(message: str) -> None:
  print(f"eve_jax.ablate: error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TABLE.value or not _WORKDIR.value:
    raise app.UsageError("--table and --workdir are required")
  try:
    chosen = [tables.get(t.strip()) for t in _TABLE.value.split(",")]
    seeds = [int(s) for s in _SEEDS.value.split(",") if s.strip()]
    sched = schedule.get_schedule(_SCHEDULE.value)
    rows = [r.strip() for r in _ROWS.value.split(";") if r.strip()]
    for table in chosen:
      for r in rows:
        table.row(r)  # a typo fails before anything runs
  except (ValueError, KeyError) as e:
    _fail(str(e).strip("'\""))
  command = " ".join(["python -m eve_jax.ablate"] + sys.argv[1:])
  for table in chosen:
    if not _REPORT_ONLY.value:
      try:
        runner.run_table(
            table,
            seeds,
            _WORKDIR.value,
            sched,
            rows=rows or None,
            log=lambda s: print(s, flush=True),
            parallel=_PARALLEL.value,
        )
      except runner.StageError as e:
        _fail(str(e))
    results = runner.collect(table, seeds, _WORKDIR.value)
    built = report.build(table, results, runner.blind(seeds, _WORKDIR.value))
    print(report.write(built, table, _WORKDIR.value, command), flush=True)


if __name__ == "__main__":
  app.run(main)
