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
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterator

from eve_jax import versions
from eve_jax.aot.targets import Target

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
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


def _array_bytes(type_text: str) -> list[int]:
  return [
      _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
      for dt, dims in _ARRAY.findall(type_text)
  ]


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "group"}} of the collectives in optimized
  HLO text. Bytes are each instruction's result (for an async start, its
  largest buffer); "group" is the largest replica group seen. A loop's
  body is counted once, however often it runs."""
  out: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: {"count": 0, "bytes": 0.0, "group": 0}
  )
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


TOP_OPS = 12  # ops and scopes the report lists by bytes

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
      out[re.sub(r"\.\d+$", "", i.name)] += i.runs
  return dict(out.most_common())


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
  out.update(
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
