"""The trainer's step compiled for TPU and GPU targets from this CPU host.

Real compile-only targets: libtpu's v5p topology (in-process) and the CUDA
plugin with an H100 target description (a subprocess of `python -m
eve_jax.compile`: the plugin must be on the path before JAX starts). Each
check reads the compiler's own output: the optimized HLO (which
collectives), memory_analysis (what fits), cost_analysis (FLOPs).

Without libtpu or the CUDA plugin these tests skip, unless
EVE_JAX_REQUIRE_COMPILE_TARGETS=1 (CI sets it), where a missing target
fails.
"""

import json
import os
import subprocess
import sys

import pytest

from eve_jax import config_lib, sharding
from eve_jax.aot import build, extrapolate, hlo, report, targets

REQUIRE = os.environ.get("EVE_JAX_REQUIRE_COMPILE_TARGETS") == "1"


def _target_or_skip(name):
  try:
    return targets.get_target(name)
  except targets.TargetError as e:
    if REQUIRE:
      raise
    pytest.skip(
        f"{e} (runs where the target's compiler is installed; CI "
        "installs it and sets EVE_JAX_REQUIRE_COMPILE_TARGETS=1)"
    )


@pytest.fixture(scope="module")
def v5p():
  return _target_or_skip("v5p:2x2x1")  # one v5p host: 4 chips


def tiny(task="pretrain", **mesh):
  c = (
      config_lib.get_pretrain_config("tiny", default_variant="base")
      if task == "pretrain"
      else config_lib.from_file(task, "tiny")
  )
  c.mesh.update(dict(data=-1, **mesh))
  return c


def compiled_report(config, target):
  built = build.lower_step(config, target.devices)
  compiled = built.lowered.compile()
  return report.report(target, built, compiled, 0.0), compiled.as_text()


@pytest.fixture(scope="module")
def pretrain_reports(v5p):
  """tiny pretraining on v5p with expert=2 and expert=1."""
  return {e: compiled_report(tiny(expert=e), v5p) for e in (2, 1)}


def test_expert_parallel_step_has_all_to_all(pretrain_reports):
  r, hlo = pretrain_reports[2]
  assert r["mesh"] == dict(data=2, fsdp=1, expert=2, tensor=1)
  # Tokens travel to their experts' chips and back, in both passes, forward
  # and backward: 2 soft layers x 2 passes x (2 + 2) = 16.
  assert r["collectives"]["all-to-all"]["count"] == 16
  assert "all-reduce" in r["collectives"]  # the data-parallel gradients
  # Compiled for a TPU, not for this CPU: TPU tiled layouts.
  assert "T(8,128)" in hlo


def test_expert_one_builds_the_batched_experts_not_the_host_form(
    pretrain_reports,
):
  """With experts unsharded the CPU host would unroll the experts into E
  matmuls (moe.py, `experts="auto"`); compiling for a TPU from a CPU must
  build the TPU's batched form: no all-to-all, no collective-permute."""
  r, hlo = pretrain_reports[1]
  assert r["mesh"]["expert"] == 1 and r["mesh"]["data"] == 4
  assert "all-to-all" not in r["collectives"]
  assert "collective-permute" not in r["collectives"]
  assert "all-reduce" in r["collectives"]
  # The batched expert product (moe.py's einsum "END,EDF->ENF"), not the
  # host's E separate matmuls over lax.split pieces.
  assert "experts/END,EDF->ENF/dot_general" in hlo
  assert "experts/split" not in hlo


def test_target_platform_comes_from_the_mesh(v5p):
  from eve_jax.model.moe import experts_unrolled

  mesh = sharding.make_mesh(dict(data=-1), v5p.devices)
  rules = sharding.parse_rules(sharding.DEFAULT_RULES)
  assert sharding.target_platform() == "cpu" and experts_unrolled("auto")
  with sharding.use(mesh, rules):
    assert sharding.target_platform() == "tpu"
    assert not experts_unrolled("auto")
  assert sharding.target_platform() == "cpu"


def test_report_keys_and_numbers(pretrain_reports):
  r, _ = pretrain_reports[2]
  for key in (
      "target",
      "devices",
      "mesh",
      "batch_size",
      "per_device_batch",
      "fits",
      "hbm_bytes",
      "memory",
      "margin_bytes",
      "compile_s",
      "flops_per_step_analytic",
      "flops_per_step_xla",
      "xla_over_analytic",
      "collectives",
      "est_step_s",
      "est_mfu",
      "estimate_method",
      "roofline_step_s",
      "cost_model_step_s",
      "sparsecore_offloads",
      "top_ops",
      "bytes_by_scope",
      "tpu_kernels",
  ):
    assert key in r, key
  m = r["memory"]
  assert m["total"] == (
      m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]
  )
  assert m["alias"] > 0.9 * m["argument"]  # the state is donated
  assert r["fits"] and r["margin_bytes"] == r["hbm_bytes"] - m["total"]
  # XLA counts the analytic matmuls plus what they leave out (capacity
  # slack, attention softmax, norms): more, but the same order.
  assert 1.0 < r["xla_over_analytic"] < 1.5
  assert r["estimate_method"] == "xla_tpu_cost_model"
  assert r["cost_model_step_s"] > 0
  # The router's backward has no scatter-add for XLA:TPU to offload to the
  # SparseCore (router.route picks the gates by a one-hot mask; top_k's values
  # gave 8 offloads here).
  assert r["sparsecore_offloads"] == 0
  assert 0 < r["est_mfu"] < 1


@pytest.mark.slow  # ~1 min on 2 cores
def test_finetune_step_compiles_for_tpu(v5p):
  c = tiny("vqa", expert=2)
  r, _ = compiled_report(c, v5p)
  assert r["fits"] and r["collectives"]["all-to-all"]["count"] > 0
  # Two passes per example in one batch, with the experts unsharded: the
  # batch stays where it is (no all-to-all, no permute; task_models.py
  # keeps each example's two rows on one device).
  c = tiny("nlvr2", expert=1)
  r, _ = compiled_report(c, v5p)
  assert r["fits"] and set(r["collectives"]) == {"all-reduce"}


@pytest.mark.slow  # ~2 min on 2 cores
def test_depth_extrapolation_matches_a_full_compile(v5p):
  """tiny at 3 and 4 blocks, extrapolated to 5, against 5 compiled."""
  c = tiny(expert=2)
  c.model.depth = 5
  full, _ = compiled_report(c, v5p)
  r = extrapolate.compile_extrapolated(c, v5p, "3,4")
  assert r["extrapolated_from"] == [3, 4]
  for key in ("argument", "output", "total"):
    assert r["memory"][key] == pytest.approx(full["memory"][key], rel=0.02)
  assert r["flops_per_step_xla"] == pytest.approx(
      full["flops_per_step_xla"], rel=0.01
  )
  assert r["flops_per_step_analytic"] == pytest.approx(
      full["flops_per_step_analytic"], rel=1e-9
  )


def test_depth_extrapolation_by_hand():
  """`combine` on two hand-made reports (depths 3 and 4 -> 6): per-step
  numbers on the line through them; compile seconds are the two compiles'
  sum (what they cost here), never a line that can go negative."""

  def rep(depth, compile_s):
    return dict(
        fits=True,
        hbm_bytes=1000,
        devices=2,
        peak_flops_per_device=1e12,
        memory=dict(
            argument=100 * depth,
            output=10 * depth,
            alias=0,
            temp=50,
            total=110 * depth + 50,
        ),
        collectives={"all-reduce": dict(count=depth, bytes=8.0 * depth)},
        flops_per_step_analytic=1e9 * depth,
        flops_per_step_xla=1.1e9 * depth,
        compute_s=0.001 * depth,
        memory_s=0.002,
        collectives_s=0.0,
        roofline_step_s=0.003,
        est_step_s=0.001 * depth,
        lower_s=2.0,
        compile_s=compile_s,
    )

  r = extrapolate.combine(rep(3, 30.0), rep(4, 5.0), 3, 4, 6)
  assert r["memory"]["total"] == 110 * 6 + 50
  assert r["collectives"]["all-reduce"] == dict(count=6, bytes=48.0)
  assert r["flops_per_step_analytic"] == pytest.approx(6e9)
  assert r["xla_over_analytic"] == pytest.approx(1.1)
  assert r["est_mfu"] == pytest.approx(6e9 / (0.006 * 2 * 1e12))
  assert r["margin_bytes"] == 1000 - 710 and r["fits"]
  assert r["compile_s"] == 35.0 and r["lower_s"] == 4.0
  assert r["extrapolated_from"] == [3, 4]
  assert not extrapolate.combine(rep(3, 1.0), rep(4, 1.0), 3, 4, 9)["fits"]
  # A roofline estimate: memory-bound at 3 and 4 blocks, compute-bound at
  # 12. The line through the two maxes (5.8 ms) would be under the
  # compute part's own line (12 ms); the max of the parts' lines is not.
  ra = dict(rep(3, 1.0), estimate_method="roofline", compute_s=0.003)
  rb = dict(rep(4, 1.0), estimate_method="roofline", compute_s=0.004)
  ra.update(memory_s=0.004, est_step_s=0.004, hbm_bytes=10**6)
  rb.update(memory_s=0.0042, est_step_s=0.0042, hbm_bytes=10**6)
  r = extrapolate.combine(ra, rb, 3, 4, 12)
  assert r["compute_s"] == pytest.approx(0.012)
  assert r["memory_s"] == pytest.approx(0.0058)
  assert r["est_step_s"] == pytest.approx(0.012)
  assert r["est_mfu"] == pytest.approx(12e9 / (0.012 * 2 * 1e12))


def test_collective_bytes_from_hlo_lines():
  """Hand-worked: result shapes -> bytes, async starts counted once."""
  hlo = "\n".join(
      [
          "  %a2a = bf16[4,8,16]{2,1,0} all-to-all(%x), replica_groups=[2,2]<=[4]",
          "  %ar = (f32[10]{0}, f32[2,3]{1,0}) all-reduce(%p, %q), "
          "replica_groups={{0,1,2,3}}, to_apply=%sum",
          "  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%y), dimensions={0}",
          "  %agd = f32[32]{0} all-gather-done(%ags)",
          "  %m = bf16[8,2]{1,0} all-to-all(%z), channel_id=3, "
          "replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1], "
          "device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}",
          "  %c = f32[4]{0} add(%u, %v)",
      ]
  )
  c = report.collectives(hlo)
  assert c["all-to-all"] == dict(
      count=2, bytes=(4 * 8 * 16 + 8 * 2) * 2, group=4
  )  # the largest: 4 on 'axis_1'
  assert (
      report._group_size(  # pylint: disable=protected-access
          "x = f32[2] all-reduce(y), replica_groups=mesh['axis_0'=4,'axis_1'=2]"
          " {'axis_0','axis_1'}, use_global_device_ids=true"
      )
      == 8
  )
  assert c["all-reduce"] == dict(count=1, bytes=(10 + 6) * 4, group=4)
  assert c["all-gather"]["count"] == 1 and c["all-gather"]["bytes"] == 128
  assert targets.accelerator_topology("v5p-64") == "v5p:2x4x4"
  assert targets.accelerator_topology("v5litepod-256") == "v5e:16x16"
  assert set(c) == {"all-to-all", "all-reduce", "all-gather"}


def test_ragged_all_to_all_bytes_are_the_rows_it_moves():
  """A ragged all-to-all's output (there) or operand (back) is sized for
  the worst case: what it moves is the smaller of the two, found through
  the operand's definition when the op is synchronous (XLA:GPU's form)."""
  hlo = "\n".join(
      [
          "  %x = f32[10,4]{1,0} parameter(0)",
          "  %w = f32[40,4]{1,0} parameter(1)",
          "  %there = f32[40,4]{1,0} ragged-all-to-all(%x, %o, %a, %b, %c, %d),"
          " replica_groups={{0,1,2,3}}",
          "  %back = f32[10,4]{1,0} ragged-all-to-all(%w, %o2, %a, %b, %c, %d),"
          " replica_groups={{0,1,2,3}}",
          "  %s = ((f32[10,4]{1,0}, f32[40,4]{1,0}, s32[4]{0}, s32[4]{0}, "
          "s32[4]{0}, s32[4]{0}), f32[40,4]{1,0}, u32[], u32[]) "
          "ragged-all-to-all-start(%x, %o, %a, %b, %c, %d), "
          "replica_groups={{0,1,2,3}}",
          "  %e = f32[40,4]{1,0} ragged-all-to-all-done(%s)",
      ]
  )
  c = report.collectives(hlo)
  assert c == {"ragged-all-to-all": dict(count=3, bytes=3 * 160, group=4)}


def test_mosaic_kernels_at_least_at_their_roofline():
  """By hand: a ragged dot that declares what its shapes give adds
  nothing to the estimate; a kernel that declares nothing (as splash
  attention does) adds its bytes at HBM bandwidth."""
  cost = '"cost_estimate":{"flops":"%d","transcendentals":"0",' % (
      2 * 576 * 128 * 512
  )
  cost += '"bytes_accessed":"%d","remote_bytes_transferred":"0"}' % (
      4 * (576 * 512 + 576 * 128 + 4 * 128 * 512)
  )
  hlo = "\n".join(
      [
          "ENTRY %main.1 (a: f32[2]) -> f32[2] {",
          "  %ragged-dot-none.3 = f32[576,512]{1,0:T(8,128)} custom-call(%a, "
          '%b, %c), custom_call_target="tpu_custom_call", '
          "operand_layout_constraints={s32[4]{0}, f32[576,128]{1,0}, "
          "f32[4,128,512]{2,1,0}}, backend_config={" + cost + "}",
          "  %ragged-dot-none.4 = f32[4,128,512]{2,1,0:T(8,128)} custom-call("
          '%a, %d, %e), custom_call_target="tpu_custom_call", '
          "operand_layout_constraints={s32[4]{0}, f32[576,128]{1,0}, "
          "f32[576,512]{1,0}}, backend_config={" + cost + "}",
          "  %splash.7 = bf16[8,256,64]{2,1,0} custom-call(%q, %k, %v), "
          'custom_call_target="tpu_custom_call", operand_layout_constraints='
          "{bf16[8,256,64]{2,1,0}, bf16[8,256,64]{2,1,0}, "
          'bf16[8,256,64]{2,1,0}}, backend_config={"custom_call_config":{}}',
          "  ROOT %r = f32[2]{0} add(%a, %a)",
          "}",
      ]
  )
  k = report.mosaic_kernels(hlo)
  rd = k["ragged-dot-none"]
  assert rd["count"] == 2 and rd["flops"] == rd["declared_flops"]
  assert rd["flops"] == 2 * 2 * 576 * 128 * 512  # forward and weight grad
  assert rd["bytes"] == rd["declared_bytes"]
  splash = k["splash"]
  assert splash["declared_flops"] == splash["declared_bytes"] == 0
  assert splash["bytes"] == 4 * 8 * 256 * 64 * 2
  target = targets.get_target("v5p:2x2x1")
  est = report.estimate(
      target,
      {"optimal_seconds": 1e-3, "flops": 0.0},
      hlo,
      dict(argument=0, output=0, temp=0),
      1e9,
  )
  assert est["estimate_method"] == "xla_tpu_cost_model"
  expected = splash["bytes"] / target.chip.hbm_bw
  assert est["kernel_correction_s"] == pytest.approx(expected)
  assert est["est_step_s"] == pytest.approx(1e-3 + expected)


def test_target_names():
  with pytest.raises(targets.TargetError, match="expected a TPU slice"):
    targets.get_target("v5p64")
  with pytest.raises(targets.TargetError, match="not one of"):
    targets.get_target("x100x8")
  text = targets.gpu_target_config(targets.GPUS["h200"])
  assert "core_count: 132" in text and "151397597184" in text


def _cli(*args, timeout=600):
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("XLA_FLAGS", None)  # no fake CPU devices needed
  return subprocess.run(
      [sys.executable, "-m", "eve_jax.compile", *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
  )


def _needs_cuda_plugin():
  if not targets.cuda_plugin_available():
    if REQUIRE:
      pytest.fail(
          "the CUDA compiler plugin is not installed: "
          + targets.CUDA_PLUGIN_INSTALL
      )
    pytest.skip(
        "no CUDA compiler plugin (runs where it is installed: "
        + targets.CUDA_PLUGIN_INSTALL
        + "; CI installs it)"
    )


# expert=1 (no all-to-all, no unrolled host form) is slow: the TPU test
# test_expert_one_builds_the_batched_experts_not_the_host_form covers it.
@pytest.mark.parametrize("expert", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_gpu_target_compiles_tiny(expert):
  """Two H100s (one node): expert-parallel has all-to-alls, expert=1 none
  (and no unrolled CPU form); XLA:GPU gives no cost analysis, so the
  estimate is the roofline."""
  _needs_cuda_plugin()
  out = _cli(
      "--config=configs/base.py:tiny",
      "--topology=h100x2",
      f"--config.mesh.expert={expert}",
      "--json",
  )
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["platform"] == "gpu" and r["devices"] == 2 and r["fits"]
  assert r["estimate_method"] == "roofline" and r["flops_per_step_xla"] is None
  if expert == 2:
    assert r["collectives"]["all-to-all"]["count"] == 16
  else:
    assert "all-to-all" not in r["collectives"]
    assert "collective-permute" not in r["collectives"]


def test_cli_reports_a_step_that_does_not_fit():
  """A 224 px tiny model at 4,096 images per chip overflows a v5e chip's
  16 GiB: exit 3 and one line with the compiler's reason."""
  _target_or_skip("v5e:2x2")
  out = _cli(
      "--config=configs/base.py:tiny",
      "--topology=v5e:2x2",
      "--config.model.image_size=224",
      "--config.train.batch_size=16384",
  )
  assert out.returncode == 3, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert "DOES NOT FIT" in lines[-1] and "memory" in lines[-1].lower()


def test_cli_one_line_errors():
  out = _cli("--config=configs/base.py:tiny", "--topology=v9z:1x1")
  assert out.returncode == 1
  assert (
      out.stderr.strip()
      .splitlines()[-1]
      .startswith("eve_jax.compile: error: TPU 'v9z'")
  )
  out = _cli(
      "--config=configs/base.py:tiny",
      "--topology=v5p:2x2x1",
      "--config.mesh.expert=3",
  )
  assert out.returncode == 1 and "config.mesh" in out.stderr


def test_search_meshes_are_exact_factorizations():
  from eve_jax.aot import search

  got = search.meshes(8, num_experts=4, heads=4, has_moe=True)
  assert {tuple(m.values()) for m in got} == {
      (d, f, e, t)
      for e in (1, 2, 4)
      for t in (1, 2, 4)
      for f in (1, 2, 4, 8)
      for d in (1, 2, 4, 8)
      if d * f * e * t == 8
  }
  assert got[0] == dict(data=2, fsdp=1, expert=4, tensor=1)
  assert all(m["expert"] == 1 for m in search.meshes(8, 4, 4, False))


def test_search_grows_k_until_it_fits_and_names_it_beside_remat():
  """Candidates: K dividing the per-device batch; the table's last lines
  name the smallest K that fits without remat and the remat row, when
  the batch does not fit whole without remat."""
  from eve_jax.aot import search

  t = targets.Target("v5p:2x2x1", "tpu", [None] * 4, None, 1)
  cands = list(search.candidates(tiny(), t, [6]))
  assert {c["grad_accum_steps"] for c in cands} == {1, 2}
  assert "--config.train.grad_accum_steps=2" in search.overrides(cands[1], 4)

  def row(k, remat, fits, step_s=None):
    r = dict(
        per_device_batch=8,
        grad_accum_steps=k,
        mesh=dict(data=4, fsdp=1, expert=1, tensor=1),
        remat=remat,
        scan=False,
        fits=fits,
        memory_total=1 << 30,
        candidate_s=1.0,
        overrides=f"K={k} remat={remat}",
    )
    if fits:
      r.update(
          est_step_s=step_s,
          est_samples_per_s=32 / step_s,
          est_mfu=0.3,
          estimate_method="roofline",
      )
    return r

  rows = [
      row(1, True, True, 0.100),
      row(2, False, True, 0.120),
      row(4, False, True, 0.130),
      row(1, False, False),
  ]
  lines = search.format_table(rows).splitlines()
  assert lines[0].startswith("| per-device batch | K |")
  assert lines[-3:] == [
      "the batch does not fit whole without remat",
      "smallest K that fits without remat: K=2, ESTIMATED 120 ms a step "
      "(K=2 remat=False)",
      "remat instead, K=1: ESTIMATED 100 ms a step (K=1 remat=True)",
  ]
  # When the whole batch fits without remat, nothing more to say.
  lines = search.format_table([row(1, False, True, 0.09)]).splitlines()
  assert lines[-1].startswith("best: ")


def test_a_step_of_k_microbatches_is_timed_as_k_of_one():
  """K x the microbatch's times; memory and analytic FLOPs the step's
  own; MFU from the whole batch's FLOPs."""
  from eve_jax.aot import step

  r = dict(
      fits=True,
      devices=4,
      peak_flops_per_device=1e12,
      flops_per_step_analytic=8e11,
      flops_per_step_xla=3e11,  # the loop's body counted once
      est_step_s=0.1,
      memory_s=0.1,
      compute_s=0.05,
      memory={"total": 5},
      estimate_method="roofline",
      cost_model_note="a scanned body is counted once",
  )
  one = dict(
      fits=True,
      flops_per_step_analytic=2e11,
      flops_per_step_xla=2.2e11,
      est_step_s=0.06,
      memory_s=0.06,
      compute_s=0.055,
      estimate_method="xla_tpu_cost_model",
  )
  out = step.microbatch_times(r, one, 4)
  assert out["est_step_s"] == pytest.approx(0.24)
  assert out["memory_s"] == pytest.approx(0.24)
  assert out["flops_per_step_xla"] == pytest.approx(8.8e11)
  assert out["flops_per_step_analytic"] == 8e11 and out["memory"]["total"] == 5
  assert out["est_mfu"] == pytest.approx(8e11 / (0.24 * 4 * 1e12))
  assert out["estimate_method"] == "4 x xla_tpu_cost_model of one microbatch"
  assert "cost_model_note" not in out


@pytest.mark.slow  # ~1.5 min on 2 cores
def test_search_ranks_what_fits(v5p):
  from eve_jax.aot import search

  rows = search.run(
      tiny(),
      v5p,
      batches="8",
      depth=None,
      vocab_size=None,
      num_answers=3129,
      max_candidates=2,
      log=lambda s: None,
  )
  assert len(rows) == 2 and all(r["fits"] for r in rows)
  speeds = [r["est_samples_per_s"] for r in rows]
  assert speeds == sorted(speeds, reverse=True)
  table = search.format_table(rows)
  assert table.splitlines()[-1] == "best: " + rows[0]["overrides"]
  assert "--config.mesh.expert=4" in rows[0]["overrides"]


def test_estimate_by_hand():
  """4 v5p chips: 10 ms of FLOPs, 20 ms of bytes, one 1.2 GB all-reduce
  over the 4 (ring: 2 x 3/4 of it sent at 600 GB/s = 3 ms)."""
  chip = targets.TPU_CHIPS["v5p"]
  t = targets.Target("v5p:2x2x1", "tpu", [None] * 4, chip, 1)
  mem = dict(argument=0, output=0, alias=0, temp=0, code=0, total=0)
  hlo = (
      "  %ar = bf16[600000000]{0} all-reduce(%g), "
      "replica_groups=[1,4]<=[4], to_apply=%sum\n"
      "  %s = (f32[8]{0}) call-start(%x), async_execution_thread="
      '"sparsecore", to_apply=%c\n'
  )
  cost = {
      "flops": chip.peak_flops * 0.010,
      "bytes accessed": chip.hbm_bw * 0.020,
      "optimal_seconds": 0.03,
  }
  r = report.estimate(t, cost, hlo, mem, 4 * chip.peak_flops * 0.010)
  assert r["compute_s"] == pytest.approx(0.010)
  assert r["memory_s"] == pytest.approx(0.020)
  assert r["collectives_s"] == pytest.approx(0.003)
  assert r["roofline_step_s"] == pytest.approx(0.023)
  # The cost model's 0.03 s as it is (the offload is counted, not added
  # back), and MFU by it.
  assert r["sparsecore_offloads"] == 1
  assert r["estimate_method"] == "xla_tpu_cost_model"
  assert r["est_step_s"] == pytest.approx(0.03)
  assert r["est_mfu"] == pytest.approx(0.010 / 0.03)
  cost["optimal_seconds"] = -0.97  # negative (v5e): not used
  r = report.estimate(t, cost, hlo, mem, 4 * chip.peak_flops * 0.010)
  assert r["estimate_method"] == "roofline"
  assert r["est_step_s"] == pytest.approx(0.023)


def test_sparsecore_offload_is_charged_like_the_gather_it_replaces(v5p):
  """An embedding lookup and its gradient, as EVE's text embedding does
  them on one v5p host: libtpu offloads the gathers to the SparseCore
  (libtpu 0.0.42 charged each -1 s, which report.estimate used to add
  back). The cost model's time with the offload is positive and within 2x
  of the same step compiled with the gather kept on the TensorCore (0.32
  vs 0.23 ms measured), so it is read as it is."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(v5p.devices), ("d",))
  table = jax.ShapeDtypeStruct(
      (30522, 768), jnp.float32, sharding=NamedSharding(mesh, P())
  )
  ids = jax.ShapeDtypeStruct(
      (4 * 3072,), jnp.int32, sharding=NamedSharding(mesh, P("d"))
  )
  lowered = jax.jit(
      jax.grad(lambda t, i: jnp.sum(jnp.take(t, i, axis=0) ** 2))
  ).lower(table, ids)
  seconds, offloads = {}, {}
  for offload in (True, False):
    opts = {} if offload else {"xla_tpu_offload_gather_to_sparsecore": False}
    compiled = lowered.compile(compiler_options=opts)
    seconds[offload] = report._cost(compiled)["optimal_seconds"]
    offloads[offload] = report.sparsecore_offloads(compiled.as_text())
  assert offloads[True] > 0 and offloads[False] == 0
  assert 0 < seconds[False] and 0 < seconds[True] < 2 * seconds[False]


_HLO_BY_HAND = """\
HloModule m

%fused_mul (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  ROOT %m = f32[256]{0} multiply(%p0, %p0)
}

%body (t: (s32[], f32[256])) -> (s32[], f32[256]) {
  %t = (s32[], f32[256]{0}) parameter(0)
  %x = f32[256]{0} get-tuple-element(%t), index=1
  %f = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/transpose(jvp(ffn_soft))/experts/mul"}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[256]{0}) tuple(%i, %f)
}

%cond (t: (s32[], f32[256])) -> pred[] {
  %t = (s32[], f32[256]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[256], b: bf16[64,32]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %b = bf16[64,32]{1,0} parameter(1)
  %w = f32[32,16]{1,0} constant({...})
  %d = f32[64,16]{1,0} dot(%b, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(attention)/dot_general"}
  %z = s32[] constant(0)
  %t0 = (s32[], f32[256]{0}) tuple(%z, %a)
  %l = (s32[], f32[256]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %o = f32[256]{0} get-tuple-element(%l), index=1
}
"""


def test_hlo_bytes_and_flops_by_hand():
  """A dot in ENTRY and a fusion in a 3-trip loop: the fusion moves
  2 x 1 KiB per run, 3 runs; the dot bf16 [64,32] + f32 [32,16] in,
  f32 [64,16] out; the dot's FLOPs 2 x 64 x 16 x 32."""
  ops = hlo.top_ops_by_bytes(_HLO_BY_HAND, n=None)
  by_name = {o["name"]: o for o in ops}
  assert set(by_name) == {"f", "d"}  # no parameters, tuples, the loop itself
  assert by_name["f"]["runs"] == 3 and by_name["f"]["bytes"] == 3 * 2048
  assert by_name["d"]["bytes"] == 64 * 32 * 2 + 32 * 16 * 4 + 64 * 16 * 4
  assert [o["name"] for o in ops] == ["d", "f"]  # 10240 > 6144 bytes
  assert hlo.bytes_by_scope(_HLO_BY_HAND) == {
      "attention/dot_general": 10240.0,
      "ffn_soft/experts": 6144.0,
  }
  assert hlo.dot_flops(_HLO_BY_HAND) == 2 * 64 * 16 * 32
  kernel = _HLO_BY_HAND.replace(
      "%m = f32[256]{0} multiply(%p0, %p0)",
      "%ragged-dot-none.3 = f32[256]{0} custom-call(%p0), "
      'custom_call_target="tpu_custom_call"',
  )
  assert hlo.tpu_kernels(kernel) == {"ragged-dot-none": 3}  # in the loop
  assert hlo.tpu_kernels(_HLO_BY_HAND) == {}
  # A predicate conditional (as XLA:GPU prints it) in the loop: both
  # branches counted as if they ran, 3 times.
  cond = _HLO_BY_HAND.replace(
      "%m = f32[256]{0} multiply(%p0, %p0)",
      "%m = f32[256]{0} conditional(%p0), true_computation=%yes, "
      "false_computation=%no",
  ).replace(
      "%body (t:",
      "%yes (q: f32[8,4]) -> f32[8,2] {\n"
      "  %q = f32[8,4]{1,0} parameter(0)\n"
      "  %k = f32[4,2]{1,0} constant({...})\n"
      "  ROOT %y = f32[8,2]{1,0} dot(%q, %k), lhs_contracting_dims={1}, "
      "rhs_contracting_dims={0}\n}\n\n"
      "%no (q: f32[8,4]) -> f32[8,2] {\n"
      "  ROOT %z = f32[8,2]{1,0} constant({...})\n}\n\n"
      "%body (t:",
  )
  assert hlo.dot_flops(cond) == 2 * 64 * 16 * 32 + 3 * 2 * 8 * 2 * 4


def test_cuda_plugin_absent_is_false_not_an_error(monkeypatch, tmp_path):
  """Without any jax plugin installed, `jax_plugins` itself is missing and
  find_spec raises: the check must say False (so the GPU tests can skip or
  fail with the install line), not crash."""
  monkeypatch.setattr(targets, "CUDA_PLUGIN_DIR", str(tmp_path))
  monkeypatch.setattr(sys, "path", [p for p in sys.path if "cuda12" not in p])
  for name in [m for m in sys.modules if m.startswith("jax_plugins")]:
    monkeypatch.delitem(sys.modules, name)
  assert targets.cuda_plugin_available() is False
  (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
  assert targets.cuda_plugin_available() is True
