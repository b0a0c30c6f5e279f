"""The software a number was measured with.

Step times, compile reports and losses move between jax, jaxlib and libtpu
releases (BENCHMARKS.md compares two stacks), so every run.jsonl, bench
JSON and compile report carries `stack()`.
"""

from __future__ import annotations

import importlib.metadata
import platform

# Installed distributions that change what is compiled or how it runs;
# those not installed (libtpu, tokamax without their extras) are left out.
PACKAGES = (
    "jax",
    "jaxlib",
    "libtpu",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tokamax",
)


def stack() -> dict[str, str]:
  """{"python": "3.12.1", "jax": "0.12.0.1", ...} of this process."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out
