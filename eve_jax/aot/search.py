"""--search: the configurations that fit a target, fastest first.

Tries mesh factorizations (data x fsdp x expert x tensor = the target's
devices; expert divides the experts, tensor the heads), remat on/off, scan
on/off, per-device batches and gradient accumulation (K microbatches of
the per-device batch: the recipe's batch in the memory of a smaller one;
for each of the others, K grows only until one fits), compiles each (as `python -m
eve_jax.compile` would: every candidate is a real compile, so each costs
what one compile costs; --max_candidates bounds them), and ranks those
that fit by ESTIMATED samples/s. The last line of the table is the
overrides to paste after `python -m eve_jax.main`.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator

from eve_jax.aot.targets import Target


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def meshes(
    n: int, num_experts: int, heads: int, has_moe: bool
) -> list[dict[str, int]]:
  """Every (data, fsdp, expert, tensor) with product n, expert dividing
  the experts (1 when there is no MoE), tensor dividing the heads (at most
  8: beyond it the per-device matmuls get thin). Plain data-parallel and
  expert-parallel first: the forms EVE's step was built around."""
  out = []
  for expert in _divisors(n):
    if expert > 1 and (not has_moe or num_experts % expert):
      continue
    for tensor in _divisors(n // expert):
      if tensor > 8 or heads % tensor:
        continue
      for fsdp in _divisors(n // (expert * tensor)):
        data = n // (expert * tensor * fsdp)
        out.append(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor))
  # Fewest model-parallel ways first, then the most expert parallelism.
  return sorted(out, key=lambda m: (m["tensor"], m["fsdp"], -m["expert"]))


ACCUM = (1, 2, 4, 8)  # grad_accum_steps tried, those dividing the batch


def candidates(
    config, target: Target, batches: list[int], accum=ACCUM
) -> Iterator[dict]:
  m = config.model
  for per_device, mesh, remat, scan, k in itertools.product(
      batches,
      meshes(target.num_devices, m.num_experts, m.heads, m.num_soft_layers > 0),
      (False, True),
      (bool(m.scan_layers), not m.scan_layers),
      accum,
  ):
    if per_device % k:
      continue
    yield dict(
        per_device_batch=per_device,
        mesh=mesh,
        remat=remat,
        scan=scan,
        grad_accum_steps=k,
    )


def _without_k(cand: dict) -> tuple:
  """A candidate's key without K: for K, the smallest that fits is
  the one to take (more microbatches only add steps of the loop)."""
  return (
      cand["per_device_batch"],
      tuple(cand["mesh"].items()),
      cand["remat"],
      cand["scan"],
  )


def overrides(cand: dict, n: int) -> str:
  mesh = " ".join(f"--config.mesh.{k}={v}" for k, v in cand["mesh"].items())
  return (
      f"{mesh} --config.train.batch_size={cand['per_device_batch'] * n}"
      f" --config.model.remat={cand['remat']}"
      f" --config.model.scan_layers={cand['scan']}"
      f" --config.train.grad_accum_steps={cand['grad_accum_steps']}"
  )


def run(
    config,
    target: Target,
    *,
    batches: str | None,
    depth: str | None,
    vocab_size: int | None,
    num_answers: int,
    max_candidates: int,
    log: Callable[[str], None],
) -> list[dict]:
  """Compiles up to `max_candidates` candidates; rows sorted with those
  that fit first, by estimated samples/s."""
  import jax  # pylint: disable=g-import-not-at-top
  from eve_jax.aot import step  # pylint: disable=g-import-not-at-top

  n = target.num_devices
  per_device = (
      [int(b) for b in batches.split(",")]
      if batches
      else [max(1, config.train.batch_size // n)]
  )
  rows, fitted = [], set()
  tried = 0
  for cand in candidates(config, target, per_device):
    if _without_k(cand) in fitted:  # a smaller K of it fits
      continue
    if tried == max_candidates:
      break
    i, tried = tried, tried + 1
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.mesh.update(cand["mesh"])
      c.train.batch_size = cand["per_device_batch"] * n
      c.model.remat, c.model.scan_layers = cand["remat"], cand["scan"]
      c.train.grad_accum_steps = cand["grad_accum_steps"]
    t0 = time.perf_counter()
    try:
      r = step.compile_one(
          c, target, depth, vocab_size=vocab_size, num_answers=num_answers
      )
    except ValueError as e:  # a batch the data shards do not divide
      log(f"[{i + 1}] {overrides(cand, n)}: skipped ({e})")
      continue
    row = dict(
        cand,
        overrides=overrides(cand, n),
        fits=r["fits"],
        candidate_s=time.perf_counter() - t0,
        memory_total=r.get("memory", {}).get("total"),
        hbm_bytes=r["hbm_bytes"],
        est_step_s=r.get("est_step_s"),
        est_mfu=r.get("est_mfu"),
        estimate_method=r.get("estimate_method"),
        error=r.get("error"),
    )
    if r["fits"]:
      row["est_samples_per_s"] = c.train.batch_size / r["est_step_s"]
      fitted.add(_without_k(cand))
    rows.append(row)
    log(
        f"[{i + 1}] {row['overrides']}: "
        + (
            f"fits, ESTIMATED {row['est_samples_per_s']:.0f} samples/s"
            if r["fits"]
            else "does not fit"
        )
        + f" ({row['candidate_s']:.0f} s)"
    )
    jax.clear_caches()
  return sorted(
      rows, key=lambda r: (not r["fits"], -r.get("est_samples_per_s", 0.0))
  )


def format_table(rows: list[dict]) -> str:
  head = (
      "| per-device batch | K | data | fsdp | expert | tensor | remat | scan "
      "| memory GiB | fits | ESTIMATED samples/s | MFU | estimate | "
      "compile s |"
  )
  lines = [head, "|" + "---|" * 14]
  for r in rows:
    mem = f"{r['memory_total'] / 2 ** 30:.1f}" if r["memory_total"] else "-"
    m = r["mesh"]
    lines.append(
        f"| {r['per_device_batch']} | {r['grad_accum_steps']} | "
        f"{m['data']} | {m['fsdp']} | "
        f"{m['expert']} | {m['tensor']} | {r['remat']} | {r['scan']} | "
        f"{mem} | {'yes' if r['fits'] else 'no'} | "
        + (
            f"{r['est_samples_per_s']:.0f} | {r['est_mfu']:.3f} | "
            f"{r['estimate_method']}"
            if r["fits"]
            else "- | - | -"
        )
        + f" | {r['candidate_s']:.0f} |"
    )
  best = next((r for r in rows if r["fits"]), None)
  lines.append(
      "best: "
      + (
          best["overrides"]
          if best
          else "nothing tried fits; try a smaller per-device "
          "batch, --config.train.grad_accum_steps or "
          "--config.model.remat=True"
      )
  )
  lines.extend(_accum_lines(rows))
  return "\n".join(lines)


def _accum_lines(rows: list[dict]) -> list[str]:
  """Where the batch does not fit whole without remat: the smallest K
  that fits without remat, beside the fastest remat row at K = 1."""
  fits = [r for r in rows if r["fits"]]
  if not rows or any(
      not r["remat"] and r["grad_accum_steps"] == 1 for r in fits
  ):
    return []
  by_k = sorted(
      (r for r in fits if not r["remat"]),
      key=lambda r: (r["grad_accum_steps"], -r["est_samples_per_s"]),
  )
  remat = next(
      (r for r in fits if r["remat"] and r["grad_accum_steps"] == 1), None
  )
  out = ["the batch does not fit whole without remat"]
  if by_k:
    r = by_k[0]
    out.append(
        f"smallest K that fits without remat: K={r['grad_accum_steps']}, "
        f"ESTIMATED {r['est_step_s'] * 1e3:.0f} ms a step "
        f"({r['overrides']})"
    )
  if remat:
    out.append(
        f"remat instead, K=1: ESTIMATED {remat['est_step_s'] * 1e3:.0f} ms "
        f"a step ({remat['overrides']})"
    )
  return out
