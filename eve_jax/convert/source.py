"""Reading a PyTorch checkpoint and taking its tensors one by one.

`Source` wraps a flat {name: array} state dict: `take` returns a tensor
checked against the shape the eve_jax parameter needs (a missing key or a
wrong shape is a one-line `ConversionError` naming the file and key),
`drop` records a tensor that has no counterpart and why; whatever is left
at the end was not expected, which is an error too (`check_all_used`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

import numpy as np


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message is one line."""


def load_torch(path: str) -> dict[str, Any]:
  """`torch.load(path, weights_only=True)` on CPU, errors in one line."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        "reading PyTorch checkpoints needs torch: pip "
        "install torch (CPU build) and -e '.[convert]'"
    ) from None
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise ConversionError(
        f"{path}: not a readable PyTorch checkpoint "
        f"({type(e).__name__}: {first})"
    ) from None


def state_dict(
    obj: Any, path: str, keys: Sequence[str] = ("model", "module", "state_dict")
) -> dict[str, np.ndarray]:
  """The flat state dict in a loaded checkpoint (under one of `keys`, or
  the object itself) as float32 NumPy arrays (integer buffers as they are).
  """
  if isinstance(obj, dict):
    for k in keys:
      if isinstance(obj.get(k), dict):
        obj = obj[k]
        break
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(
        f"{path}: no state dict (a dict of tensors, or one "
        f"under {list(keys)})"
    )
  out = {}
  for name, value in obj.items():
    if not hasattr(value, "detach"):
      continue  # non-tensor entries (epoch, config, ...)
    t = value.detach().cpu()
    if t.is_floating_point():
      out[name] = t.float().numpy()
    else:
      out[name] = t.numpy()
  if not out:
    raise ConversionError(f"{path}: the state dict holds no tensors")
  return out


def strip_prefix(
    sd: dict[str, np.ndarray], prefixes: Iterable[str]
) -> dict[str, np.ndarray]:
  """Drops the first of `prefixes` that every key starting with it shares
  (e.g. DDP's `module.`), when all keys have it."""
  for p in prefixes:
    if sd and all(k.startswith(p) for k in sd):
      return {k[len(p) :]: v for k, v in sd.items()}
  return sd


class Source:
  """A state dict being converted: tensors are taken, dropped or left."""

  def __init__(self, sd: dict[str, np.ndarray], path: str):
    self.sd = dict(sd)
    self.path = path
    self.used: set[str] = set()
    self.dropped: dict[str, str] = {}

  def has(self, key: str) -> bool:
    return key in self.sd

  def shape(self, key: str, expected: str) -> tuple[int, ...]:
    """The shape of `key`, which must exist (`expected` describes it)."""
    if key not in self.sd:
      raise ConversionError(f"{self.path}: missing {key} ({expected})")
    return tuple(self.sd[key].shape)

  def take(self, key: str, shape: Sequence[int]) -> np.ndarray:
    """The tensor `key`, which must exist with exactly `shape`."""
    if key not in self.sd:
      raise ConversionError(
          f"{self.path}: missing {key} (expected shape " f"{list(shape)})"
      )
    value = self.sd[key]
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(
          f"{self.path}: {key} has shape "
          f"{list(value.shape)}, expected {list(shape)}"
      )
    self.used.add(key)
    return value

  def drop(self, key: str, reason: str) -> None:
    if key in self.sd:
      self.dropped[key] = reason
      self.used.add(key)

  def drop_matching(self, pattern: str, reason: str) -> None:
    """Drops every key that `re.fullmatch`es `pattern`."""
    for k in self.sd:
      if re.fullmatch(pattern, k):
        self.drop(k, reason)

  def drop_prefixes(self, prefixes: Iterable[str]) -> None:
    """Drops what the user asked to leave out (`--drop PREFIX`)."""
    for prefix in prefixes:
      self.drop_matching(re.escape(prefix) + ".*", f"--drop {prefix}")

  def check_all_used(self) -> None:
    """Raises naming the first key nothing took or dropped."""
    left = sorted(set(self.sd) - self.used)
    if left:
      more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
      raise ConversionError(
          f"{self.path}: unexpected key {left[0]} with shape "
          f"{list(self.sd[left[0]].shape)}{more}: not in the expected layout "
          "(--drop PREFIX leaves such tensors out)"
      )

  def dropped_report(self) -> list[list]:
    return [
        [k, list(self.sd[k].shape), why]
        for k, why in sorted(self.dropped.items())
    ]
