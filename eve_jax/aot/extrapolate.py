"""Reports for models too big to compile here, from two smaller depths.

Every per-step quantity of EVE's step grows linearly with the number of
hard-router blocks (each adds the same parameters, optimizer state,
activations, FLOPs and gradient all-reduce bytes): compiling the model at
depths A and B (soft-router layers, decoder, heads unchanged) and drawing
the line through them gives the full depth's numbers. Checked against one
full-depth compile (tests/test_compile.py at tiny size; BENCHMARKS.md for
EVE-Base).

The two compiles are unscanned even when the model scans its layers: XLA's
cost analysis counts a loop body once, so a scanned model's FLOPs, bytes
and cost-model time would not grow with depth. The report says so
(`extrapolated_unscanned`); scanning changes the memory little (the
same stacked parameters and saved activations) and the compile time much.
"""

from __future__ import annotations

import copy
from typing import Any

# Compile and lowering seconds are not among them: they are what the two
# compiles took here (summed), a cost, not a property of the full depth
# (and too noisy on a shared machine for a line through two points).
LINEAR = (
    "flops_per_step_analytic",
    "flops_per_step_xla",
    "compute_s",
    "memory_s",
    "collectives_s",
    "roofline_step_s",
    "cost_model_step_s",
    "kernel_correction_s",
    "est_step_s",
)


def parse_depths(
    text: str, depth: int, num_soft_layers: int
) -> tuple[int, int]:
  """ "A,B" -> (A, B), each more than the soft-router layers, A < B."""
  try:
    a, b = (int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--depth={text!r}: expected two depths A,B") from None
  if not num_soft_layers < a < b:
    raise ValueError(
        f"--depth={text!r}: need {num_soft_layers} < A < B "
        f"(the model has {num_soft_layers} soft-router layers "
        f"on top of its hard-router ones; depth {depth})"
    )
  return a, b


def line(va: float, vb: float, a: int, b: int, d: int) -> float:
  return va + (vb - va) * (d - a) / (b - a)


def combine(ra: dict, rb: dict, a: int, b: int, d: int) -> dict[str, Any]:
  """The depth-d report through the depth-a and depth-b ones."""
  if not (ra["fits"] and rb["fits"]) and (
      "memory" not in ra or "memory" not in rb
  ):
    out = dict(rb if not rb["fits"] else ra)
    out["extrapolated_from"] = [a, b]
    return out
  out = copy.deepcopy(rb)
  for k in LINEAR:
    if ra.get(k) is not None and rb.get(k) is not None:
      out[k] = line(ra[k], rb[k], a, b, d)
  out["memory"] = {
      k: int(line(ra["memory"][k], rb["memory"][k], a, b, d))
      for k in rb["memory"]
  }
  for kind, c in out["collectives"].items():
    ca = ra["collectives"].get(kind, {"count": 0, "bytes": 0.0})
    c["count"] = int(round(line(ca["count"], c["count"], a, b, d)))
    c["bytes"] = line(ca["bytes"], c["bytes"], a, b, d)
  for k in ("lower_s", "compile_s"):
    out[k] = ra[k] + rb[k]
  out["margin_bytes"] = int(out["hbm_bytes"] - out["memory"]["total"])
  out["fits"] = out["margin_bytes"] >= 0
  if "roofline" in out.get("estimate_method", ""):
    # A roofline is a max() of two lines, not a line: the parts' lines
    # first, then the max (the line through two maxes can fall below a
    # part where the step turns compute-bound between the two depths).
    out["roofline_step_s"] = (
        max(out["compute_s"], out["memory_s"]) + out["collectives_s"]
    )
    out["est_step_s"] = out["roofline_step_s"] + out.get(
        "kernel_correction_s", 0.0
    )
  if out.get("flops_per_step_xla"):
    out["xla_over_analytic"] = (
        out["flops_per_step_xla"] / out["flops_per_step_analytic"]
    )
  out["est_mfu"] = out["flops_per_step_analytic"] / (
      out["est_step_s"] * out["devices"] * out["peak_flops_per_device"]
  )
  out["extrapolated_from"] = [a, b]
  return out


def compile_extrapolated(config, target, depths: str, **kw) -> dict:
  """compile.compile_one at the two depths of `depths`, then `combine`."""
  from eve_jax.aot import step  # pylint: disable=g-import-not-at-top

  if config.model.get("ffn_plan"):
    raise ValueError(
        "--depth extrapolates EVE's layout (soft blocks on top); it does not "
        f"take model.ffn_plan={config.model.ffn_plan!r}: compile full depth"
    )
  d, soft = int(config.model.depth), int(config.model.num_soft_layers)
  a, b = parse_depths(depths, d, soft)
  reports = []
  for depth in (a, b):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.model.depth = depth
      c.model.scan_layers = False
    reports.append(step.compile_one(c, target, **kw))
  out = combine(reports[0], reports[1], a, b, d)
  out["extrapolated_unscanned"] = bool(config.model.scan_layers)
  return out
