"""One compile: the report of a config's training step on a target."""

from __future__ import annotations

import time

from eve_jax import storage
from eve_jax.aot import build, extrapolate, report


def compile_one(
    config,
    target,
    depth: str | None = None,
    hlo_out: str | None = None,
    vocab_size: int | None = None,
    num_answers: int = 3129,
) -> dict:
  """The report of `config`'s step on `target` (depth-extrapolated when
  `depth` is "A,B").

  With train.grad_accum_steps K > 1 the step holds a loop over its
  microbatches, whose body XLA's cost analysis counts once: memory is
  that compile's, and the step time is K times the ESTIMATED step of one
  microbatch (batch B / K at K = 1, compiled beside it), which counts the
  optimizer update K times (errs slow) and the gradients' all-reduce K
  times (as XLA runs it: inside the loop, once per microbatch).
  """
  if depth:
    # Each depth's compile times its microbatch (below); the line through
    # them is then K x the microbatch's line.
    return extrapolate.compile_extrapolated(
        config, target, depth, vocab_size=vocab_size, num_answers=num_answers
    )
  r = _compile(config, target, hlo_out, vocab_size, num_answers)
  k = config.train.get("grad_accum_steps", 1)
  if k > 1 and r["fits"]:
    one = config.copy_and_resolve_references()
    with one.unlocked():
      one.train.batch_size //= k
      one.train.grad_accum_steps = 1
    r = microbatch_times(
        r, compile_one(one, target, None, None, vocab_size, num_answers), k
    )
  return r


def microbatch_times(r: dict, one: dict, k: int) -> dict:
  """`r` (the step of K microbatches) with the times of K x `one` (the
  step of one microbatch)."""
  r = dict(r)
  if not one.get("fits"):  # not expected: it holds less than `r`'s
    r["estimate_method"] = (
        f"{r['estimate_method']}, the microbatch loop counted once "
        "(one microbatch alone did not compile)"
    )
    return r
  for key in extrapolate.LINEAR:
    if key != "flops_per_step_analytic" and one.get(key) is not None:
      r[key] = k * one[key]
  if r.get("flops_per_step_xla"):
    r["xla_over_analytic"] = (
        r["flops_per_step_xla"] / r["flops_per_step_analytic"]
    )
  r["estimate_method"] = f"{k} x {one['estimate_method']} of one microbatch"
  r.pop("cost_model_note", None)
  r["est_mfu"] = r["flops_per_step_analytic"] / (
      r["est_step_s"] * r["devices"] * r["peak_flops_per_device"]
  )
  return r


def _compile(config, target, hlo_out, vocab_size, num_answers) -> dict:
  built = build.lower_step(
      config, target.devices, vocab_size=vocab_size, num_answers=num_answers
  )
  t0 = time.perf_counter()
  try:
    compiled = built.lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if report.is_out_of_memory(e):
      return report.does_not_fit(
          target, built, report.oom_line(e), time.perf_counter() - t0
      )
    raise
  compile_s = time.perf_counter() - t0
  if hlo_out:  # a local path or gs://
    storage.write_text(hlo_out, compiled.as_text())
  return report.report(target, built, compiled, compile_s)
