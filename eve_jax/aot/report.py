"""What a compiled step tells before it runs: memory, collectives, FLOPs,
and an ESTIMATED step time.

Everything measured here comes from the compiler: `memory_analysis()`
(per-device bytes), `cost_analysis()` (TPU only; XLA:GPU returns None) and
the optimized HLO text (collectives). The step time is never measured: it
is one of two estimates, each named in the report by `estimate_method`:

  - "xla_tpu_cost_model": XLA's TPU cost model (`optimal_seconds`), read
    as it is. Used on TPU when the program has no loop (a scanned body is
    counted once, which undercounts a scanned model) and the value is
    positive (v5e's is not, even on the tiny model). The ops XLA offloads
    to the SparseCore (async `call-start`s on the "sparsecore" thread) are
    counted in the report: libtpu 0.0.42 charged each -1 s, and eve_jax
    added them back; libtpu 0.0.50.1 charges them a positive time close
    to that of the same gather left on the TensorCore (tests/test_compile.py
    compiles one both ways), so nothing is added back any more.
  - "roofline": max(FLOPs / peak, bytes / HBM bandwidth) + collective
    bytes / interconnect bandwidth, with the chip's published figures
    (targets.py) and no overlap of communication with compute (so it
    errs slow). Used on GPU and for scanned models; its FLOPs are the
    larger of XLA's count and eve_jax's analytic count, its bytes XLA's
    `bytes accessed` where there is one, else every argument, output and
    temporary moved once (a lower bound). With no term for kernels that
    run below peak, its MFU is an upper bound.

Either way, Mosaic kernels (TPU custom calls: Pallas kernels, XLA's
ragged dot) count for what they declare in their `cost_estimate`, and a
kernel may declare less than it does (jax's splash attention declares
nothing). `kernel_correction_s` adds, per kind of kernel, what its
roofline from its own shapes (hlo.mosaic_kernels) exceeds the roofline of
what it declared; it is part of `est_step_s`, so that a kernel counted as
free never reads as a gain. XLA's ragged dot declares its FLOPs exactly
and more bytes than its operands hold: it adds nothing.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

from eve_jax import versions
from eve_jax.aot.hlo import (
    _array_bytes,
    bytes_by_scope,
    top_ops_by_bytes,
    mosaic_kernels,
    tpu_kernels,
)
from eve_jax.aot.targets import Target

TOP_OPS = 12  # ops and scopes the report lists by bytes

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)
_OP = re.compile(r" (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
# replica_groups=mesh['axis_0'=2,'axis_1'=2] ... {'axis_0'}: groups over the
# listed axes of that mesh.
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")


def _group_size(line: str) -> int:
  """Devices in one replica group of a collective (0 if not stated)."""
  if g := _GROUPS_MESH.search(line):
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", g.group(1)))
    return math.prod(
        int(sizes[a])
        for a in re.findall(r"'([^']+)'", g.group(2))
        if a in sizes
    )
  if g := _GROUPS_IOTA.search(line):
    return int(g.group(2))
  if g := _GROUPS_LIST.search(line):
    return len(g.group(1).split(","))
  return 0


_DEFINES = re.compile(r"^\s+(?:ROOT )?%([^\s=]+) = (.+?) [\w-]+\(")
_FIRST_OPERAND = re.compile(r"ragged-all-to-all(?:-start)?\(%([^,\s)]+)")


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "group"}} of the collectives in optimized
  HLO text. Bytes are each instruction's result (for an async start, its
  largest buffer), but for a ragged all-to-all: the smaller of its operand
  and its output, which is what it moves (one side is sized for the worst
  case, every device sending all its rows to one; the other holds the
  rows of one device). "group" is the largest replica group seen. A loop's
  body is counted once, however often it runs."""
  out: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"count": 0, "bytes": 0.0, "group": 0}
  )
  types: dict[str, str] = {}
  for line in hlo.splitlines():
    if d := _DEFINES.match(line):
      types[d.group(1)] = d.group(2)
  for line in hlo.splitlines():
    if " = " not in line:
      continue
    m = _OP.search(line)
    if not m or m.start() < line.index(" = "):
      continue
    sizes = _array_bytes(line[line.index(" = ") + 3 : m.start()])
    if not sizes:
      continue
    kind = out[m.group(1)]
    kind["count"] += 1
    if m.group(1) == "ragged-all-to-all":
      if m.group(2):  # ((operand, output, offsets...), output, ...)
        kind["bytes"] += min(sizes[:2])
      else:
        operand = _FIRST_OPERAND.search(line)
        given = _array_bytes(types.get(operand.group(1), "")) if operand else []
        kind["bytes"] += min(sizes[0], given[0]) if given else sizes[0]
    else:
      kind["bytes"] += max(sizes) if m.group(2) else sum(sizes)
    kind["group"] = max(kind["group"], _group_size(line))
  return dict(out)


def sparsecore_offloads(hlo: str) -> int:
  """Async calls XLA:TPU runs on the SparseCore (the gathers and scatters
  it offloads: with libtpu 0.0.50.1, EVE's embedding lookups and the
  gather dispatcher's row gathers)."""
  return sum(
      1
      for line in hlo.splitlines()
      if " call-start(" in line
      and 'async_execution_thread="sparsecore"' in line
  )


def has_loop(hlo: str) -> bool:
  """Whether the program holds a while loop (scanned layers)."""
  return re.search(r" while\(", hlo) is not None


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of the compiled step. `total` = arguments + outputs
  - what the outputs alias (the donated state) + temporaries + code: what
  the device must hold at the step's peak."""
  m = compiled.memory_analysis()
  out = dict(
      argument=m.argument_size_in_bytes,
      output=m.output_size_in_bytes,
      alias=m.alias_size_in_bytes,
      temp=m.temp_size_in_bytes,
      code=m.generated_code_size_in_bytes,
  )
  out["total"] = (
      out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  )
  return out


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(cost or {})


def _transfer_factor(kind: str, group: int) -> float:
  """Bytes each device sends per result byte: ring all-reduce 2(n-1)/n,
  the others (n-1)/n; a permute sends its whole buffer."""
  n = max(group, 2)
  if kind == "all-reduce":
    return 2 * (n - 1) / n
  if kind == "collective-permute":
    return 1.0
  return (n - 1) / n


def estimate(
    target: Target,
    compiled_cost: dict[str, float],
    hlo: str,
    mem: dict[str, int],
    step_flops_analytic: float,
) -> dict[str, Any]:
  """The ESTIMATED step time and MFU (module docstring), with the parts of
  the roofline and which method was used."""
  n, chip = target.num_devices, target.chip
  per_host = n // max(target.hosts, 1)
  xla_flops = float(compiled_cost.get("flops", 0.0))
  flops_dev = max(xla_flops, step_flops_analytic / n)
  # Without XLA's count (GPU): every argument, output and temporary buffer
  # moved once (temporaries written and read back): a lower bound.
  bytes_dev = float(compiled_cost.get("bytes accessed", 0.0)) or float(
      mem["argument"] + mem["output"] + 2 * mem["temp"]
  )
  comm_s = 0.0
  for kind, c in collectives(hlo).items():
    # A group wider than one host's devices crosses the (slower) network.
    bw = chip.node_bw if c["group"] > per_host else chip.link_bw
    comm_s += c["bytes"] * _transfer_factor(kind, c["group"] or n) / bw
  parts = dict(
      compute_s=flops_dev / chip.peak_flops,
      memory_s=bytes_dev / chip.hbm_bw,
      collectives_s=comm_s,
  )
  roofline = max(parts["compute_s"], parts["memory_s"]) + comm_s
  out: dict[str, Any] = dict(roofline_step_s=roofline, **parts)
  method, step_s = "roofline", roofline
  if target.platform == "tpu" and "optimal_seconds" in compiled_cost:
    model_s = float(compiled_cost["optimal_seconds"])
    out.update(
        cost_model_step_s=model_s, sparsecore_offloads=sparsecore_offloads(hlo)
    )
    if has_loop(hlo):
      out["cost_model_note"] = (
          "a scanned body is counted once: the cost "
          "model undercounts; roofline used (its "
          "bytes too are a lower bound); --depth "
          "compiles unscanned"
      )
    elif model_s > 0:
      method, step_s = "xla_tpu_cost_model", model_s
    else:  # v5e: -997 ms for the tiny model
      out["cost_model_note"] = (
          f"the cost model gave {model_s:.3g} s: roofline used"
      )
  kernels = mosaic_kernels(hlo)
  t = lambda f, b: max(f / chip.peak_flops, b / chip.hbm_bw)  # noqa: E731
  correction = sum(
      max(
          0.0,
          t(k["flops"], k["bytes"])
          - t(k["declared_flops"], k["declared_bytes"]),
      )
      for k in kernels.values()
  )
  step_s += correction
  out.update(
      kernel_correction_s=correction,
      estimate_method=method,
      est_step_s=step_s,
      est_mfu=step_flops_analytic / (step_s * n * chip.peak_flops),
  )
  return out


def report(target: Target, built, compiled, compile_s: float) -> dict:
  """The compile report of one step (keys in README, "Before you launch").
  All per-device numbers are of one device of the target."""
  hlo = compiled.as_text()
  mem = memory(compiled)
  cost = _cost(compiled)
  n = target.num_devices
  step_flops = built.flops_per_sample * built.batch_size
  xla_flops = float(cost.get("flops", 0.0)) * n
  out = dict(
      target=target.describe(),
      platform=target.platform,
      devices=n,
      mesh={k: int(v) for k, v in built.mesh.shape.items()},
      batch_size=built.batch_size,
      per_device_batch=built.batch_size / n,
      grad_accum_steps=built.grad_accum_steps,
      fits=True,
      hbm_bytes=int(target.chip.hbm_bytes),
      memory=mem,
      margin_bytes=int(target.chip.hbm_bytes - mem["total"]),
      lower_s=built.lower_s,
      compile_s=compile_s,
      flops_per_step_analytic=step_flops,
      flops_per_step_xla=xla_flops or None,
      xla_over_analytic=(xla_flops / step_flops) if xla_flops else None,
      collectives=collectives(hlo),
      peak_flops_per_device=target.chip.peak_flops,
      versions=versions.stack(),
  )
  out.update(estimate(target, cost, hlo, mem, step_flops))
  # Where the bytes go (for finding what to slim, not a time).
  out["tpu_kernels"] = tpu_kernels(hlo)
  out["mosaic_kernels"] = mosaic_kernels(hlo)
  out["top_ops"] = top_ops_by_bytes(hlo, TOP_OPS)
  out["bytes_by_scope"] = dict(list(bytes_by_scope(hlo).items())[:TOP_OPS])
  # The compiler accepted it; a total past the chip's HBM would still not
  # run (the compiler's own limit can differ from the published figure).
  out["fits"] = out["margin_bytes"] >= 0
  return out


def does_not_fit(target: Target, built, message: str, compile_s: float) -> dict:
  """The report of a step the compiler refused for memory."""
  return dict(
      target=target.describe(),
      platform=target.platform,
      devices=target.num_devices,
      mesh={k: int(v) for k, v in built.mesh.shape.items()},
      batch_size=built.batch_size,
      per_device_batch=built.batch_size / target.num_devices,
      grad_accum_steps=built.grad_accum_steps,
      fits=False,
      hbm_bytes=int(target.chip.hbm_bytes),
      error=message,
      lower_s=built.lower_s,
      compile_s=compile_s,
  )


def is_out_of_memory(e: Exception) -> bool:
  text = str(e)
  return (
      "RESOURCE_EXHAUSTED" in text
      or "Ran out of memory" in text
      or "exceeds available" in text
      or "out of memory" in text.lower()
  )


def oom_line(e: Exception) -> str:
  """The compiler's own out-of-memory sentence, on one line."""
  for line in str(e).splitlines():
    if "memory" in line.lower() or "exceeds" in line:
      return line.strip()[:300]
  return str(e).strip().splitlines()[0][:300]
