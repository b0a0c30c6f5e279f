"""Runs `python -m eve_jax.main ARGS`, but kills itself with SIGKILL right
after the asynchronous checkpoint save of step K has started, while orbax is
still writing it: a node dying in the middle of a checkpoint write.

  python tests/crash_driver.py K ARGS...
"""

import os
import signal
import sys

from eve_jax import checkpoint, main


def _kill_in_save(kill_step: int) -> None:
  real = checkpoint.Checkpointer.save

  def save(self, step, state, data_state):
    real(self, step, state, data_state)
    if step == kill_step:
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.Checkpointer.save = save


if __name__ == "__main__":
  _kill_in_save(int(sys.argv[1]))
  sys.argv = [sys.argv[0]] + sys.argv[2:]
  main.run()
