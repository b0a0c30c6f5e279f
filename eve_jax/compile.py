r"""Compile the training step for a TPU slice or GPU nodes, from this machine.

  python -m eve_jax.compile --config=configs/base.py --topology=v5p:4x4x4 \
      [--num_slices=N] [--config.mesh.expert=8 --config.train.batch_size=...] \
      [--json] [--hlo_out=step.hlo] [--depth=4,6] [--search] [--top_fusions=N]

Builds exactly the step the trainer would run (trainer.build_program for
the config's task: same shardings, donated state) over compile-only
devices (eve_jax/aot/targets.py), compiles it, and reports per device:
memory against HBM and the margin, whether it fits (the compiler's
out-of-memory is a result: exit code 3), compile seconds, XLA's FLOPs
against eve_jax.flops, collectives by kind with bytes, and an ESTIMATED
step time and MFU with the method that gave it (eve_jax/aot/report.py).

--depth=A,B compiles the model at A and B blocks instead of its own depth
and extrapolates linearly (memory, FLOPs, collectives, step time): for
models whose full compile does not fit this machine's memory or time.
--search tries meshes, remat, scan and per-device batches and prints those
that fit, fastest first (eve_jax/aot/search.py).

Nothing runs on an accelerator; JAX_PLATFORMS defaults to cpu here.
"""

from __future__ import annotations

import json
import os
import sys

# Before JAX loads (the config file imports it): compile-only targets need
# no local accelerator, and the CUDA compiler plugin is found only if its
# directory is on the path when JAX discovers plugins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's start-up asks the cloud metadata server and the environment for
# a TPU VM's identity; there is none on a compile-only host.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu takes a lock file for the chips of a host; compile-only processes
# use none, so several may run at once (one per --search candidate, tests).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
from eve_jax.aot import targets as _targets  # noqa: E402  (no jax import)


def _topology_arg(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--topology="):
      return a.split("=", 1)[1]
    if a == "--topology" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


# Only for GPU targets: loaded, the plugin logs that it found no CUDA.
if _targets.is_gpu_name(_topology_arg(sys.argv)):
  _targets.ensure_cuda_plugin_path()

from absl import app, flags  # noqa: E402
from eve_jax.aot import step  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/base.py or configs/vqa.py.",
    lock_config=True,
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "v5p:4x4x4, v6e:8x8, v5e:16x16 ... or h100x8, "
    "h200x8, h100x8x4 (nodes x GPUs).",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_HLO_OUT = flags.DEFINE_string(
    "hlo_out", None, "Write the optimized HLO text here."
)
_DEPTH = flags.DEFINE_string(
    "depth",
    None,
    "A,B: compile at A and B blocks and extrapolate to the " "model's depth.",
)
_SEARCH = flags.DEFINE_bool(
    "search", False, "Try meshes / remat / scan / batches / grad_accum_steps."
)
_BATCHES = flags.DEFINE_string(
    "per_device_batch",
    None,
    "--search: per-device batches to try "
    "(comma separated; default the config's).",
)
_MAX_CANDIDATES = flags.DEFINE_integer(
    "max_candidates", 24, "--search: compile at most this many."
)
_VOCAB = flags.DEFINE_integer(
    "vocab_size",
    None,
    "Tokenizer vocabulary (default data.vocab_size or " "model.vocab_size).",
)
_ANSWERS = flags.DEFINE_integer("num_answers", 3129, "VQA answer vocabulary.")
_TOP = flags.DEFINE_integer(
    "top_fusions",
    0,
    "Also print the step's N top-level ops (fusions, custom calls, copies) "
    "and model scopes by bytes moved (the JSON always has 12 of each).",
)
# Accepted and unused, so that a launcher can pass a run's own arguments.
flags.DEFINE_string("workdir", None, "Ignored (a run's flag).")

EXIT_DOES_NOT_FIT = 3


def format_report(r: dict, top: int = 0) -> str:
  """The report as a few human lines (and the `top` ops and scopes by
  bytes, when asked)."""
  g = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
  mesh = (
      " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
      or "one device"
  )
  k = r.get("grad_accum_steps", 1)
  lines = [
      f"{r['target']}; mesh {mesh}; batch {r['batch_size']} "
      f"({r['per_device_batch']:g} per device"
      + (f", in {k} microbatches" if k > 1 else "")
      + ")"
  ]
  if not r["fits"] and "memory" not in r:
    lines.append(f"DOES NOT FIT: {r['error']}")
    return "\n".join(lines)
  m = r["memory"]
  lines.append(
      f"memory per device: {g(m['total'])} of {g(r['hbm_bytes'])} "
      f"(arguments {g(m['argument'])}, outputs {g(m['output'])}, aliased "
      f"{g(m['alias'])}, temp {g(m['temp'])}); margin "
      f"{g(r['margin_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}"
  )
  xla = r.get("xla_over_analytic")
  lines.append(
      f"compile {r['compile_s']:.1f} s (lowering {r['lower_s']:.1f} s"
      + ("; both depths" if "extrapolated_from" in r else "")
      + "); "
      f"FLOPs per step {r['flops_per_step_analytic']:.4g} analytic"
      + (
          f", XLA {r['flops_per_step_xla']:.4g} ({xla:.3f}x)"
          if xla
          else ", XLA: no cost analysis on this platform"
      )
  )
  coll = (
      ", ".join(
          f"{k} {int(v['count'])} ({v['bytes'] / 2 ** 20:.1f} MiB)"
          for k, v in sorted(r["collectives"].items())
      )
      or "none"
  )
  lines.append(f"collectives per device: {coll}")
  lines.append(
      f"ESTIMATED step {r['est_step_s'] * 1e3:.3g} ms, MFU "
      f"{r['est_mfu']:.3f} ({r['estimate_method']}; roofline "
      f"{r['roofline_step_s'] * 1e3:.1f} ms = max(compute "
      f"{r['compute_s'] * 1e3:.1f}, memory {r['memory_s'] * 1e3:.1f}) + "
      f"collectives {r['collectives_s'] * 1e3:.1f} ms"
      + (
          f"; TPU cost model {r['cost_model_step_s'] * 1e3:.1f} ms, "
          f"{r['sparsecore_offloads']} SparseCore offloads"
          if "cost_model_step_s" in r
          else ""
      )
      + ")"
  )
  if r.get("extrapolated_from"):
    lines.append(
        f"(extrapolated linearly from depths "
        f"{r['extrapolated_from']}"
        + (", compiled unscanned" if r.get("extrapolated_unscanned") else "")
        + ")"
    )
  if r.get("tpu_kernels"):
    lines.append(
        "Mosaic kernels (the cost model charges what each declares; "
        "declared / from their shapes): "
        + ", ".join(
            f"{name} x{k['count']} {k['declared_flops'] / 1e9:.3g} / "
            f"{k['flops'] / 1e9:.3g} GFLOP, {k['declared_bytes'] / 2**20:.0f}"
            f" / {k['bytes'] / 2**20:.0f} MiB"
            for name, k in r.get("mosaic_kernels", {}).items()
        )
        + f"; +{r.get('kernel_correction_s', 0.0) * 1e3:.3g} ms to the "
        "estimate for what they declare below their roofline"
    )
  if r.get("cost_model_note"):
    lines.append(f"note: {r['cost_model_note']}")
  if r.get("versions"):
    v, keys = r["versions"], ["jax", "jaxlib"]
    if r.get("platform") == "tpu":
      keys.append("libtpu")  # the TPU compiler; GPU: the jaxlib's plugin
    lines.append(
        "compiled with " + ", ".join(f"{k} {v[k]}" for k in keys if k in v)
    )
  if top and r.get("top_ops"):
    deeper = " (of the deeper compile)" if r.get("extrapolated_from") else ""
    lines.append(f"bytes moved per step by model scope{deeper}:")
    for name, b in list(r["bytes_by_scope"].items())[:top]:
      lines.append(f"  {b / 2 ** 20:10.1f} MiB  {name}")
    lines.append(f"top-level ops by bytes moved per step{deeper}:")
    for o in r["top_ops"][:top]:
      lines.append(
          f"  {o['bytes'] / 2 ** 20:10.1f} MiB  {o['op']} x{o['runs']}  "
          f"{o['op_name']}"
      )
  return "\n".join(lines)


def _fail(message: str) -> None:
  print(f"eve_jax.compile: error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError(
        "--config and --topology are required, e.g. "
        "--config=configs/base.py --topology=v5p:2x2x2"
    )
  config = _CONFIG.value
  try:
    target = _targets.get_target(_TOPOLOGY.value, _NUM_SLICES.value)
    if _SEARCH.value:
      from eve_jax.aot import search  # pylint: disable=g-import-not-at-top

      rows = search.run(
          config,
          target,
          batches=_BATCHES.value,
          depth=_DEPTH.value,
          vocab_size=_VOCAB.value,
          num_answers=_ANSWERS.value,
          max_candidates=_MAX_CANDIDATES.value,
          log=lambda s: print(s, file=sys.stderr, flush=True),
      )
      print(json.dumps(rows) if _JSON.value else search.format_table(rows))
      sys.exit(0 if any(r["fits"] for r in rows) else EXIT_DOES_NOT_FIT)
    r = step.compile_one(
        config,
        target,
        _DEPTH.value,
        _HLO_OUT.value,
        _VOCAB.value,
        _ANSWERS.value,
    )
  except ValueError as e:  # TargetError, mesh / batch / config errors
    _fail(str(e).strip().splitlines()[0])
  print(json.dumps(r) if _JSON.value else format_report(r, _TOP.value))
  if not r["fits"]:
    sys.exit(EXIT_DOES_NOT_FIT)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, its errors (a config typo, a bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    _fail(" ".join(x.strip() for x in text.strip().splitlines()[:1]))
    raise  # unreachable: _fail exits


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
