"""Reading optimized HLO text by walking it: which computations run and
how often per step (a while body by its known trip count, fusions, calls
and conditional branches as often as their caller), every instruction
with its result type and operands, and what eve_jax.aot.report reports
from them: bytes moved by op and by model scope, the FLOPs of dots
(through loops, which XLA's cost analysis counts once), and Mosaic
kernels. Text in, numbers out: no JAX needed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterator

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _array_bytes(type_text: str) -> list[int]:
  return [
      _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
      for dt, dims in _ARRAY.findall(type_text)
  ]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^\s(]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([^\s=]+) = (\S+) ([\w-]+)\((.*)$")
_CALLEES = re.compile(
    r"(?:calls|body|to_apply|true_computation|false_computation)=%([^\s,}]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(type_text: str) -> list[int]:
  m = _ARRAY.search(type_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _computations(
    hlo: str,
) -> tuple[dict[str, list[str]], list[str], collections.Counter]:
  """The computations of optimized HLO text: {name: instruction lines},
  their order (ENTRY last), and how many times each runs per step (a
  while body by its known trip count, 1 where unknown; fusions and calls
  as often as their caller)."""
  comps: dict[str, list[str]] = {}
  order: list[str] = []
  name = None
  for line in hlo.splitlines():
    if m := _COMPUTATION.match(line):
      name = m.group(1)
      comps[name], _ = [], order.append(name)
    elif name is not None and line.startswith("  "):
      comps[name].append(line)
  runs: collections.Counter = collections.Counter()
  if not order:
    return comps, order, runs
  # Callees are printed before their callers and ENTRY last: walk back
  # from it, handing each computation's run count to what it calls.
  runs[order[-1]] = 1
  for comp in reversed(order):
    n = runs[comp]
    if not n:
      continue
    for line in comps[comp]:
      trips = 1
      if " while(" in line and (t := _TRIP_COUNT.search(line)):
        trips = int(t.group(1))
      callees = _CALLEES.findall(line)
      for branches in _BRANCHES.findall(line):
        # Each branch as if it ran: an upper bound (a cond that skips
        # empty tiles still counts them).
        callees += re.findall(r"%([^\s,]+)", branches)
      for callee in callees:
        runs[callee] += n * trips
  return comps, order, runs


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  type_text: str  # the result's type, e.g. "f32[64,16]{1,0}"
  op: str
  operands: list[str]
  line: str
  runs: int  # times it runs per step
  shapes: dict[str, str]  # its computation's instructions so far -> type


def _instructions(hlo: str, top_level: bool = False) -> Iterator[_Instruction]:
  """Every instruction of the computations that run (`_computations`);
  `top_level`: not those inside a fusion."""
  comps, order, runs = _computations(hlo)
  fused = set()
  if top_level:
    fused = {
        c
        for lines in comps.values()
        for line in lines
        if " fusion(" in line
        for c in re.findall(r"calls=%([^\s,}]+)", line)
    }
  for comp in order:
    if not runs[comp] or comp in fused:
      continue
    shapes: dict[str, str] = {}
    for line in comps[comp]:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, type_text, op, rest = m.groups()
      shapes[name] = type_text
      operands = re.findall(r"%([^\s,)]+)", rest.split(")", 1)[0])
      yield _Instruction(
          name, type_text, op, operands, line, runs[comp], shapes
      )


# Ops that move no data of their own at the top level of a computation.
_FREE_OPS = frozenset(
    "parameter constant get-tuple-element tuple bitcast while call "
    "conditional after-all partition-id replica-id".split()
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def top_ops_by_bytes(hlo: str, n: int | None = 10) -> list[dict[str, Any]]:
  """The `n` (None: all) top-level ops of optimized HLO (fusions, custom calls, dots,
  copies, collectives; not the inside of a fusion) that move the most
  bytes per step: result plus operand bytes as the HLO types them, times
  how often the op runs. For ranking where a step's bytes go, not for a
  time: XLA's own `bytes accessed` (the roofline's memory term) counts
  otherwise (3.2 x this sum for EVE-Base at depth 2 on v5p).

  Returns:
    [{"name", "op", "bytes", "runs", "op_name"}], largest first; op_name
    is the JAX source op the HLO metadata names.
  """
  out = []
  for i in _instructions(hlo, top_level=True):
    if i.op in _FREE_OPS or i.op.endswith("-done"):
      continue
    moved = sum(_array_bytes(i.type_text)) + sum(
        sum(_array_bytes(i.shapes.get(o, ""))) for o in i.operands
    )
    name_m = _OP_NAME.search(i.line)
    out.append(
        dict(
            name=i.name,
            op=i.op,
            bytes=float(moved * i.runs),
            runs=int(i.runs),
            op_name=name_m.group(1) if name_m else "",
        )
    )
  out.sort(key=lambda r: -r["bytes"])
  return out if n is None else out[:n]


def scope(op_name: str, depth: int = 2) -> str:
  """The model part an op belongs to, from its JAX op_name: the jit and
  the autodiff wrappers dropped, `depth` components kept
  ("jit(train_step)/transpose(jvp(ffn_soft))/experts/END,EDF->ENF/..."
  -> "ffn_soft/experts")."""
  parts = []
  for part in op_name.split("/")[1:]:
    while m := re.fullmatch(
        r"(?:jvp|transpose|jit|vmap|remat\w*)\((.*)\)", part
    ):
      part = m.group(1)
    if part:
      parts.append(part)
  return "/".join(parts[:depth]) or "(none)"


def bytes_by_scope(hlo: str, depth: int = 2) -> dict[str, float]:
  """Bytes moved per step (as `top_ops_by_bytes` counts them) summed by
  `scope`, largest first."""
  totals: collections.Counter = collections.Counter()
  for r in top_ops_by_bytes(hlo, n=None):
    totals[scope(r["op_name"], depth)] += r["bytes"]
  return dict(totals.most_common())


def dot_flops(hlo: str) -> float:
  """2 x multiply-adds of every dot and ragged dot in optimized HLO text,
  each counted as many times as it runs: a while loop's body by its known
  trip count (XLA's `cost_analysis` counts a body once), nested loops and
  fusions multiplied through, every branch of a conditional counted as if
  it ran. A ragged dot [M, K] x [G, K, N] counts
  M * K * N (each row meets one group). A loop without a known trip count
  is counted once."""
  total = 0.0
  for i in _instructions(hlo):
    if i.op not in ("dot", "ragged-dot"):
      continue
    lhs = _dims(i.shapes.get(i.operands[0], ""))
    out = math.prod(_dims(i.type_text))
    if i.op == "dot":
      c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.line)
      contract = math.prod(
          lhs[int(d)] for d in (c.group(1).split(",") if c else []) if d
      )
      total += i.runs * 2.0 * out * contract
    else:  # [M, K] x [G, K, N] -> [M, N]
      total += i.runs * 2.0 * out * lhs[-1]
  return total


_COST_ESTIMATE = re.compile(
    r'"cost_estimate":\{"flops":"(\d+)"[^}]*"bytes_accessed":"(\d+)"'
)
_LAYOUTS = re.compile(r"operand_layout_constraints=\{(.*?\})\}")


def _kernel_name(name: str) -> str:
  return re.sub(r"\.\d+$", "", name)


def mosaic_kernels(hlo: str) -> dict[str, dict[str, float]]:
  """What each kind of Mosaic kernel declares to the TPU cost model and
  what it does, per step (summed over its runs).

  {kind: {"count", "declared_flops", "declared_bytes", "flops", "bytes"}}:
  declared: the `cost_estimate` in the kernel's backend config (0 where
  it declares none, as jax's splash attention); done: bytes of its
  floating-point operands and result, and for a ragged dot ([M, K] x
  [G, K, N] -> [M, N], or [M, K] x [M, N] -> [G, K, N] in the backward)
  2 * M * K * N FLOPs at its buffer's M rows. For other kernels the FLOPs
  are not known from the HLO: their declared FLOPs are taken.
  """
  out: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: dict(
          count=0, declared_flops=0.0, declared_bytes=0.0, flops=0.0, bytes=0.0
      )
  )
  for i in _instructions(hlo):
    if not (
        i.op == "custom-call"
        and 'custom_call_target="tpu_custom_call"' in i.line
    ):
      continue
    k = out[_kernel_name(i.name)]
    k["count"] += i.runs
    declared = _COST_ESTIMATE.search(i.line)
    d_flops, d_bytes = (
        (float(declared[1]), float(declared[2])) if declared else (0.0, 0.0)
    )
    k["declared_flops"] += i.runs * d_flops
    k["declared_bytes"] += i.runs * d_bytes
    layouts = _LAYOUTS.search(i.line)
    operands = _ARRAY.findall(layouts.group(1)) if layouts else []
    floats = [
        (dt, [int(d) for d in dims.split(",") if d])
        for dt, dims in operands + _ARRAY.findall(i.type_text)
        if dt.startswith(("f", "bf"))
    ]
    k["bytes"] += i.runs * max(
        d_bytes if not floats else 0.0,
        sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in floats),
    )
    if "ragged-dot" in i.name and len(floats) == 3:
      sizes = [math.prod(dims) for _, dims in floats]
      groups = next(dims[0] for _, dims in floats if len(dims) == 3)
      k["flops"] += i.runs * 2.0 * math.sqrt(math.prod(sizes) / groups)
    else:
      k["flops"] += i.runs * d_flops
  return dict(out)


def tpu_kernels(hlo: str) -> dict[str, int]:
  """Mosaic kernels (TPU custom calls: Pallas kernels, and XLA's own
  lowering of a ragged dot) by name, as many times as they run per step.
  The TPU cost model charges each what it declares (splash attention
  declares nothing, so it is free to the estimate); the report counts
  them so that a step time that leans on them can be read as such."""
  out: collections.Counter = collections.Counter()
  for i in _instructions(hlo):
    if (
        i.op == "custom-call"
        and 'custom_call_target="tpu_custom_call"' in i.line
    ):
      out[_kernel_name(i.name)] += i.runs
  return dict(out.most_common())
