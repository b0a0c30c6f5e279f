r"""The entry point: reads flags, then runs the task the config names.

  python -m eve_jax.main --config=configs/base.py:tiny --workdir=/tmp/eve_tiny \
      [--config.train.steps=50 --config.seed=1 ...]

Running it again with the same --workdir resumes from the last checkpoint.

Several hosts: every process runs the same command. On a Cloud TPU VM and
under SLURM's `srun` they find each other by themselves; elsewhere pass
--coordinator=HOST:PORT --num_processes=N --process_id=I (launch/README.md).
Bad input (a config typo, missing data, a mismatched checkpoint) ends with
one line on stderr and exit code 1; the full traceback goes to the log at
debug verbosity (-v 1).
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import logging as std_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/base.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics, eval."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    "HOST:PORT of process 0, for a multi-process run "
    "outside Cloud TPU and SLURM (which are detected by themselves).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, N)."
)
# jax.distributed's own defaults are 100 / 300 / 300 s: kept, but named, so
# a launcher can shorten them (tests do) and README can say what they mean.
_HEARTBEAT_S = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "A process whose heartbeat the coordinator "
    "misses this long counts as lost: every other process is then ended "
    "(non-zero exit) instead of waiting in a collective forever.",
)
_INIT_TIMEOUT_S = flags.DEFINE_integer(
    "init_timeout_s", 300, "How long processes wait for each other at start."
)
_SHUTDOWN_TIMEOUT_S = flags.DEFINE_integer(
    "shutdown_timeout_s",
    300,
    "How long a finished process waits for the " "others at exit.",
)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax/grain/gcsfs (dozens of lines per
  checkpoint); their warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "gcsfs")
    )


def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(
        "--config is required, e.g. " "--config=configs/base.py:tiny"
    )
  try:
    config.task  # pylint: disable=pointless-statement
  except OSError as e:  # ml_collections loads the file lazily
    last = [x for x in str(e).splitlines() if x.strip()][-1].strip()
    _fail(f"cannot load the --config file: {last}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Imported here so that `--help` and flag errors do not pay for JAX.
  # pylint: disable=g-import-not-at-top
  from eve_jax import sharding, trainer
  from eve_jax.tasks import registry

  try:
    registry.get(config.task)
  except ValueError as e:
    _fail(str(e))
  import jax
  # pylint: enable=g-import-not-at-top
  try:
    init_distributed()
    mesh = sharding.make_mesh(config.mesh)
    trainer.run(config, _WORKDIR.value, mesh)
  except (ValueError, FileNotFoundError, KeyError) as e:
    logging.debug("%s", traceback.format_exc())
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _peer_lost(e)


def _peer_lost(e: Exception) -> None:
  """A collective failed in a multi-process run: a peer is gone (on CPU
  gloo says so at once; on TPU and GPU the coordinator ends every process
  after --heartbeat_timeout_s, and the step watchdog catches what hangs).
  One line, then exit 1 at once: jax's own shutdown barrier would wait
  --shutdown_timeout_s for the dead peer and then abort."""
  import jax  # pylint: disable=g-import-not-at-top
  from eve_jax.watchdog import resume_note  # pylint: disable=g-import-not-at-top

  logging.debug("%s", traceback.format_exc())
  first = " ".join(str(e).split())[:300]
  print(
      f"eve_jax: error: process {jax.process_index()}: a collective "
      f"failed, a peer process is most likely lost ({first}); restart "
      f"every process: {resume_note(_WORKDIR.value, 30)}",
      file=sys.stderr,
      flush=True,
  )
  os._exit(1)  # pylint: disable=protected-access


def cluster_detected() -> str | None:
  """The multi-host environment jax.distributed can configure itself from:
  'slurm' inside an `srun` step of several tasks, 'tpu' on a Cloud TPU VM
  (one host or a pod slice), else None."""
  if (
      int(os.environ.get("SLURM_NTASKS", "1")) > 1
      and "SLURM_STEP_ID" in os.environ
  ):
    return "slurm"
  # TPU chips show up as /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later;
  # VFIO also exists on other machines, hence the libtpu check).
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  if (
      glob.glob("/dev/accel[0-9]*")
      or os.environ.get("TPU_WORKER_HOSTNAMES")
      or (has_libtpu and glob.glob("/dev/vfio/[0-9]*"))
  ):
    return "tpu"
  return None


def init_distributed() -> None:
  """Joins the other processes, from the flags or the detected cluster.

  Must run before anything touches a device. Raises ValueError (one line)
  for an incomplete or inconsistent set of flags.
  """
  import jax  # pylint: disable=g-import-not-at-top

  given = {
      "coordinator": _COORDINATOR.value,
      "num_processes": _NUM_PROCESSES.value,
      "process_id": _PROCESS_ID.value,
  }
  if any(v is not None for v in given.values()):
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
          f"a multi-process run needs --coordinator, "
          f"--num_processes and --process_id; missing "
          f"{', '.join(missing)}"
      )
    if not 0 <= given["process_id"] < given["num_processes"]:
      raise ValueError(
          f"--process_id={given['process_id']} is not in "
          f"[0, --num_processes={given['num_processes']})"
      )
    jax.distributed.initialize(
        coordinator_address=given["coordinator"],
        num_processes=given["num_processes"],
        process_id=given["process_id"],
        **_timeouts(),
    )
  elif cluster_detected():
    logging.info(
        "%s detected: jax.distributed.initialize()", cluster_detected()
    )
    jax.distributed.initialize(**_timeouts())
  if jax.process_count() > 1:
    logging.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _timeouts() -> dict[str, int]:
  return dict(
      heartbeat_timeout_seconds=_HEARTBEAT_S.value,
      initialization_timeout=_INIT_TIMEOUT_S.value,
      shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT_S.value,
  )


def _fail(message: str) -> None:
  print(f"eve_jax: error: {message}", file=sys.stderr)
  sys.exit(1)


def _error_text(e: Exception) -> str:
  """One line from a flag-parsing error (absl and ml_collections sometimes
  carry the repr of a multi-line message)."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    # ml_collections embeds the config file's traceback: keep the flag and
    # the exception at its end.
    head = lines[0].split("Traceback")[0].strip()
    return f"{head} {lines[-1]}".strip()
  return " ".join(lines) or repr(e)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with its errors (--config.train.stpes=3, a value of
  the wrong type) as our one line instead of absl's two."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises the non-flags errors for --config.a.b=...
    # typos and bad types.
    _fail(_unknown_key(e, argv) or _error_text(e))
    raise  # unreachable: _fail exits


def _unknown_key(e: Exception, argv: list[str]) -> str | None:
  """The override that names a key the config does not have, when
  ml_collections says only the key (no close match to suggest)."""
  key = _error_text(e).strip("'\"")  # the key's repr, in a repr
  if not (isinstance(e, (AttributeError, KeyError)) and key.isidentifier()):
    return None
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if name.startswith("--config.") and name.split(".")[-1] == key:
      path = name[len("--config.") :]
      return f"{name}: this config has no key {path!r}"
  return None


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
