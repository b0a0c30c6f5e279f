r"""The entry point: reads flags, then runs the task the config names.

  python -m eve_jax.main --config=configs/base.py:tiny --workdir=/tmp/eve_tiny \
      [--config.train.steps=50 --config.seed=1 ...]

Running it again with the same --workdir resumes from the last checkpoint.
Bad input (a config typo, missing data, a mismatched checkpoint) ends with
one line on stderr and exit code 1; the full traceback goes to the log at
debug verbosity (-v 1).
"""

from __future__ import annotations

import logging as std_logging
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/base.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: checkpoints, metrics, eval.")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax/grain (dozens of lines per checkpoint);
  their warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain")))


def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. "
                         "--config=configs/base.py:tiny")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Imported here so that `--help` and flag errors do not pay for JAX.
  from eve_jax import train  # pylint: disable=g-import-not-at-top
  tasks = {"pretrain": train.run}
  if config.task not in tasks:
    _fail(f"config.task={config.task!r} is not one of {sorted(tasks)}")
  try:
    tasks[config.task](config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, KeyError) as e:
    logging.debug("%s", traceback.format_exc())
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def _fail(message: str) -> None:
  print(f"eve_jax: error: {message}", file=sys.stderr)
  sys.exit(1)


def run() -> None:
  try:
    app.run(main)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for --config.a.b=... typos and bad types,
    # while parsing flags, before main() runs.
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


if __name__ == "__main__":
  run()
