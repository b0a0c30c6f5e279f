"""Meshes, axis rules, expert parallelism and sharded training (8 CPU devices)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax import config_lib, program, sharding, train, trainer
from eve_jax.checkpoint import Checkpointer
from eve_jax.data.tokenizer import Tokenizer
from eve_jax.model import eve
from eve_jax.model.moe import ModalityMoE
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.variants import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = sharding.parse_rules(sharding.DEFAULT_RULES)


def mesh_of(**axes):
  cfg = {**dict(data=1, fsdp=1, expert=1, tensor=1), **axes}
  n = int(np.prod(list(cfg.values())))
  return sharding.make_mesh(cfg, devices=jax.devices()[:n])


# --- mesh and rules ----------------------------------------------------------


def test_mesh_shape_fills_the_one_minus_one():
  assert sharding.mesh_shape(dict(data=-1), 8) == dict(
      data=8, fsdp=1, expert=1, tensor=1
  )
  assert sharding.mesh_shape(dict(data=2, expert=-1), 8)["expert"] == 4
  assert sharding.mesh_shape(dict(data=1, fsdp=4, expert=2), 8)["fsdp"] == 4


@pytest.mark.parametrize(
    "axes,devices,words",
    [
        (dict(data=3), 8, "needs 3 devices, but there are 8"),
        (dict(data=-1, expert=3), 8, "not divisible"),
        (dict(data=-1, fsdp=-1), 8, "at most one -1"),
        (dict(data=0), 8, "sizes must be >= 1"),
        (dict(model=2), 8, "unknown axes ['model']"),
    ],
)
def test_mesh_shape_errors_are_one_line(axes, devices, words):
  with pytest.raises(ValueError) as e:
    sharding.mesh_shape(axes, devices)
  assert words in str(e.value) and "\n" not in str(e.value)


def test_logical_to_spec_by_hand():
  shape = dict(data=2, fsdp=2, expert=2, tensor=1)
  # FSDP on the width, tensor axis of size 1 dropped.
  assert sharding.logical_to_spec(
      ("embed", "mlp"), (128, 512), RULES, shape
  ) == jax.sharding.PartitionSpec("fsdp", None)
  # The batch over every data-parallel axis that divides it.
  assert sharding.logical_to_spec(
      ("act_batch",), (8,), RULES, shape
  ) == jax.sharding.PartitionSpec(("data", "fsdp", "expert"))
  assert sharding.logical_to_spec(
      ("act_batch",), (6,), RULES, shape
  ) == jax.sharding.PartitionSpec("data")
  # A 41-word vocabulary does not split in two: replicated.
  t2 = dict(data=1, fsdp=1, expert=1, tensor=2)
  assert sharding.logical_to_spec(
      ("embed", "vocab"), (128, 41), RULES, t2
  ) == jax.sharding.PartitionSpec(None, None)
  # A mesh axis is used once per array: mlp takes tensor, heads cannot.
  assert sharding.logical_to_spec(
      ("mlp", "heads"), (8, 8), RULES, t2
  ) == jax.sharding.PartitionSpec("tensor", None)


def test_parse_rules_rejects_unknown_mesh_axes():
  assert sharding.parse_rules({"act_batch": "data, expert", "kv": ""}) == (
      ("act_batch", ("data", "expert")),
      ("kv", ()),
  )
  with pytest.raises(ValueError, match="config.axis_rules.embed='model'"):
    sharding.parse_rules({"embed": "model"})


def test_batch_and_expert_divisibility_errors():
  mesh = mesh_of(data=2, expert=4)
  sharding.check_batch("train.batch_size", 16, mesh, RULES)
  with pytest.raises(
      ValueError,
      match=r"train.batch_size=12 is not divisible "
      r"by the 8 data-parallel shards \(data x fsdp x expert",
  ):
    sharding.check_batch("train.batch_size", 12, mesh, RULES)
  sharding.check_experts(8, 2, mesh, RULES)
  with pytest.raises(
      ValueError,
      match="model.num_experts=6 is not divisible "
      "by the expert-parallel size 4",
  ):
    sharding.check_experts(6, 2, mesh, RULES)
  sharding.check_experts(6, 0, mesh, RULES)  # no soft-router layer: fine


def test_process_batch_slice_single_process():
  mesh = mesh_of(data=2, expert=2, tensor=2)
  sh = sharding.batch_sharding(mesh, RULES, 8)
  assert sharding.process_batch_slice(sh, 8) == (0, 1)


@pytest.mark.parametrize(
    "variant", ["base", "large", "base_scan", "large_scan"]
)
def test_parameter_layouts_match_the_golden_files(variant):
  """Every EVE-Base/Large parameter's names and layout on a 2x4x8x2 mesh,
  unrolled and with scan_layers, as reviewed in tests/golden/; regenerate
  with `python tests/dump_sharding.py` only when a change is intended."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import dump_sharding  # pylint: disable=g-import-not-at-top

  with open(os.path.join(dump_sharding.GOLDEN, f"sharding_{variant}.txt")) as f:
    want = f.read().splitlines()
  got = dump_sharding.layout(variant).splitlines()
  assert got == want, "layouts changed; see tests/dump_sharding.py"
  # What the golden file must say, in any case: experts on `expert`, every
  # large matrix split somewhere, nothing unnamed.
  for line in got:
    shape = [int(d) for d in re.search(r" \[([\d, ]+)\] ", line)[1].split(",")]
    if np.prod(shape) >= 2**20:  # every weight of a million or more
      assert re.search(r"P\(.*'(fsdp|tensor|expert)'", line), line
    if "['wi']" in line and "'expert'" in line:
      assert "P('expert', 'fsdp', 'tensor')" in line, line
  assert sum("'expert'" in line for line in got) == (
      4 * (2 if variant.startswith("base") else 3)
  )
  if variant.endswith("_scan"):  # hard-router blocks stacked, kept whole
    depth = 12 if variant.startswith("base") else 24
    scanned = [
        line for line in got if line.startswith("['backbone']" "['scanned']")
    ]
    assert scanned and all(
        f" [{depth - (2 if depth == 12 else 3)}, " in line
        and "['layers'," in line
        and "P(None" in line
        for line in scanned
    )


# --- the MoE layer under expert parallelism ---------------------------------


def _moe_outputs(mesh, num_experts=8, batch=16, length=20):
  dim, hidden = 32, 64

  def build():
    return ModalityMoE(
        dim, hidden, MoEConfig(num_experts, top_k=2), rngs=nnx.Rngs(3)
    )

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  state_sh = sharding.tree_shardings(abstract, mesh, RULES)
  x_sh = sharding.batch_sharding(mesh, RULES, batch)
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (batch, length, dim))
  modality = (jnp.arange(length) >= 12).astype(jnp.int32)[None].repeat(batch, 0)
  valid = jax.random.bernoulli(keys[1], 0.9, (batch, length))

  def loss(params, x, modality, valid):
    y, stats = nnx.merge(graphdef, params)(x, modality, valid)
    return jnp.sum(jnp.sin(y)) + stats.aux_loss, (y, stats.dropped)

  with sharding.use(mesh, RULES):
    params = jax.jit(lambda: nnx.state(build()), out_shardings=state_sh)()
    args = [jax.device_put(a, x_sh) for a in (x, modality, valid)]
    fn = jax.jit(
        jax.value_and_grad(loss, has_aux=True),
        in_shardings=(state_sh, x_sh, x_sh, x_sh),
    )
    (_, (y, dropped)), grads = fn(params, *args)
  return params, y, dropped, grads


def test_moe_is_the_same_on_1_2_4_8_expert_shards():
  """Outputs, dropped counts and gradients do not depend on how many devices
  the experts are spread over; each device holds 1/expert of the weights."""
  _, y_ref, drop_ref, g_ref = _moe_outputs(mesh_of())
  assert float(drop_ref) > 0  # capacity binds, so dropping is compared too
  for e in (2, 4, 8):
    params, y, dropped, grads = _moe_outputs(mesh_of(data=8 // e, expert=e))
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6
    )
    assert float(dropped) == float(drop_ref)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6
      )
    for name in ("wi", "wo", "bi", "bo"):
      arr = params[name][...]
      per_device = {s.device: s.data.nbytes for s in arr.addressable_shards}
      assert len(per_device) == 8
      assert set(per_device.values()) == {arr.nbytes // e}, (name, e)


# --- the compiled step -------------------------------------------------------


def micro_config(**mesh):
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.model.update(
      dict(depth=2, decoder_depth=1, num_soft_layers=1, num_experts=8)
  )
  c.train.update(
      dict(
          steps=4,
          batch_size=16,
          log_every=1,
          eval_every=0,
          checkpoint_every=2,
          eval_examples=16,
          eval_batch_size=16,
      )
  )
  c.data.num_tokenizer_captions = 500
  c.mesh.data = 1
  c.mesh.update(mesh)
  return c


def _compile_step(config, tokenizer, mesh=None):
  """The train step compiled for `config.mesh` (or `mesh`), from shapes."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  rules = sharding.parse_rules(config.axis_rules)
  with sharding.use(mesh, rules):
    prog = train.build_program(config, tokenizer, mesh, rules)
    m, bs = prog.model_cfg, config.train.batch_size
    spec = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=prog.batch_sharding
    )
    batch = {
        "image": spec((bs, m.image_size, m.image_size, 3), jnp.float32),
        "text": spec((bs, m.max_text_len), jnp.int32),
        "text_valid": spec((bs, m.max_text_len), bool),
    }
    return prog.step.lower(prog.abstract, batch).compile(), prog


def _collectives(hlo, op):
  """(result shapes, line) of every `op` instruction in an HLO module."""
  out = []
  for line in hlo.splitlines():
    if re.search(rf"\s{op}(-start)?\(", line) and "=" in line:
      lhs = line.split(f" {op}")[0]
      out.append((re.findall(r"\w+\[([\d,]*)\]", lhs), line.strip()))
  return out


@pytest.fixture(scope="module")
def compiled_steps(tokenizer):
  """The micro model's train step compiled on three meshes."""
  out = {}
  for axes in (dict(), dict(data=8), dict(data=2, expert=4)):
    mesh = mesh_of(**axes)
    compiled, prog = _compile_step(micro_config(**axes), tokenizer, mesh)
    out[tuple(axes.items())] = (compiled, prog, mesh)
  return out


def test_expert_parallel_step_uses_all_to_all_not_weight_gathers(
    compiled_steps,
):
  """data=2 x expert=4: tokens go to the experts' devices by all-to-all
  (forward and backward), and no device ever gathers the full [E, D, F]
  expert weights."""
  compiled, prog, _ = compiled_steps[(("data", 2), ("expert", 4))]
  hlo = compiled.as_text()
  a2a = _collectives(hlo, "all-to-all")
  assert len(a2a) >= 4, "expected dispatch + combine, forward and backward"
  m = prog.model_cfg
  full = {
      f"{m.num_experts},{m.width},{m.mlp_dim}",
      f"{m.num_experts},{m.mlp_dim},{m.width}",
  }
  gathers = _collectives(hlo, "all-gather")
  assert not [line for shapes, line in gathers if full & set(shapes)]
  # Sanity of the check itself: the parameters really are [E, D, F].
  wi = [
      v
      for k, v in jax.tree_util.tree_leaves_with_path(prog.abstract.params)
      if "['wi']" in jax.tree_util.keystr(k)
      and len(v.shape) == 3
      and v.shape[0] == m.num_experts
  ]
  assert wi and {",".join(map(str, w.shape)) for w in wi} <= full
  assert all(w.sharding.spec[0] == "expert" for w in wi)
  # ...and the pattern does find collectives: the data-parallel gradient
  # reduction is there.
  assert _collectives(hlo, "all-reduce")


def test_step_flops_do_not_grow_with_the_mesh(compiled_steps):
  """XLA's per-device FLOPs x devices stays close to the single-device count:
  the mesh splits the work instead of repeating it."""
  flops = {
      k: program.xla_flops(c) * mesh.size
      for k, (c, _, mesh) in compiled_steps.items()
  }
  base = flops[()]
  for v in flops.values():
    assert 0.9 * base <= v <= 1.3 * base, flops


# --- training on meshes ------------------------------------------------------


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return np.array([json.loads(line)["loss"] for line in f])


def _train(config, workdir, mesh=None):
  return trainer.run(config, str(workdir), mesh)


MESHES = (dict(data=2, expert=4), dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The micro model trained 4 steps on one device and on MESHES."""
  root = tmp_path_factory.mktemp("meshes")
  runs = {(): (root / "one", _train(micro_config(), root / "one", mesh_of()))}
  for axes in MESHES:
    name = "_".join(f"{k}{v}" for k, v in axes.items())
    runs[tuple(axes.items())] = (
        root / name,
        _train(micro_config(**axes), root / name),
    )
  return runs


def test_meshes_train_the_same(trained):
  """Same losses (float32, 1e-4 relative) and parameters on one device and
  on meshes with expert and tensor parallelism and FSDP."""
  ref_dir, ref = trained[()]
  want = _losses(ref_dir)
  for axes in MESHES:
    workdir, out = trained[tuple(axes.items())]
    np.testing.assert_allclose(
        _losses(workdir), want, rtol=1e-4, err_msg=str(axes)
    )
    for a, b in zip(
        jax.tree.leaves(out.state.params), jax.tree.leaves(ref.state.params)
    ):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5
      )
  # The state lives in the mesh's layout: FSDP on width, tensor on hidden.
  wi = out.state.params["backbone"]["blocks"][1]["ffn"]["wi"][...]
  assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_scanned_layers_train_the_same_on_a_mesh(trained, tmp_path):
  """model.scan_layers on data=2 x fsdp=2 x tensor=2: the losses and, back in
  the unrolled layout, the parameters of the unrolled one-device run; the
  stacked weights keep their `layers` axis whole."""
  config = micro_config(data=2, fsdp=2, tensor=2)
  config.model.scan_layers = True
  out = _train(config, tmp_path)
  ref_dir, ref = trained[()]
  np.testing.assert_allclose(_losses(tmp_path), _losses(ref_dir), rtol=1e-4)
  wi = out.state.params["backbone"]["scanned"]["ffn"]["wi"][...]
  assert wi.shape[0] == 1  # the micro model's one hard-router block
  assert wi.sharding.spec == jax.sharding.PartitionSpec(
      None, None, "fsdp", "tensor"
  )
  got = nnx.to_pure_dict(out.state.params)
  cfg = ModelConfig.from_config(config.model, vocab_size=64)
  got["backbone"] = eve.unscan_layout(got["backbone"], cfg)
  want = nnx.to_pure_dict(ref.state.params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5
    )


@pytest.mark.slow  # ~2 min on 2 cores, beside the fixture's runs
def test_dropless_with_experts_over_4_devices_trains_like_one(
    trained, tmp_path
):
  """moe_dispatch="ragged" with the experts over 4 devices (ragged_shards:
  the rows exchanged between expert shards) trains the micro model as on
  one device; and dropless, it drops nothing where the capacity path of
  the same routing does."""

  def ragged(**axes):
    c = micro_config(**axes)
    c.model.moe_dispatch = "ragged"
    c.train.checkpoint_every = 0
    return c

  _train(ragged(), tmp_path / "one", mesh_of())
  _train(ragged(data=2, expert=4), tmp_path / "sharded")
  np.testing.assert_allclose(
      _losses(tmp_path / "sharded"), _losses(tmp_path / "one"), rtol=1e-4
  )

  def dropped(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return [r["dropped_token_frac"] for r in rows if "dropped_token_frac" in r]

  assert (
      dropped(tmp_path / "sharded") and max(dropped(tmp_path / "sharded")) == 0
  )
  capacity_dir, _ = trained[(("data", 2), ("expert", 4))]
  assert max(dropped(capacity_dir)) > 0


@pytest.mark.slow
def test_tiny_20_steps_same_loss_on_five_meshes(tmp_path):
  """The issue's check at full size: configs/base.py:tiny, 20 steps."""

  def tiny(**axes):
    c = config_lib.get_pretrain_config("tiny", default_variant="base")
    c.train.update(
        dict(
            steps=20,
            log_every=1,
            eval_every=0,
            checkpoint_every=0,
            eval_examples=128,
        )
    )
    c.mesh.data = 1
    c.mesh.update(axes)
    return c

  _train(tiny(), tmp_path / "one", mesh_of())
  want = _losses(tmp_path / "one")
  for axes in (
      dict(data=8),
      dict(data=2, expert=4),
      dict(fsdp=4, expert=2),
      dict(data=2, fsdp=2, tensor=2),
  ):
    name = "_".join(f"{k}{v}" for k, v in axes.items())
    _train(tiny(**axes), tmp_path / name)
    np.testing.assert_allclose(
        _losses(tmp_path / name), want, rtol=1e-4, err_msg=name
    )


def test_checkpoint_from_8_devices_restores_on_2(trained):
  """Saved with FSDP and tensor parallelism over 8 devices, restored onto a
  2-device expert-parallel mesh: identical values, the new layout."""
  workdir, out = trained[(("data", 2), ("fsdp", 2), ("tensor", 2))]
  small = micro_config(expert=2)
  mesh = mesh_of(expert=2)
  rules = sharding.parse_rules(small.axis_rules)
  with sharding.use(mesh, rules):
    prog = train.build_program(
        small, Tokenizer(str(workdir / "tokenizer.model")), mesh, rules
    )
    ckpt = Checkpointer(str(workdir), every=2, keep=3)
    state, data_state = ckpt.restore(ckpt.latest_step(), prog.abstract)
    ckpt.close()
  assert int(state.step) == 4 and data_state
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(out.state)
  ):
    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path)
    )
    assert a.sharding.device_set == set(mesh.devices.flat)
  wi = state.params["backbone"]["blocks"][1]["ffn"]["wi"][...]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("expert", None, None)


# --- the command line ---------------------------------------------------------


def _main(*args, devices=1):
  env = dict(
      os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.main",
          "--config=configs/base.py:tiny",
          *args,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


@pytest.mark.parametrize(
    "args,words",
    [
        (
            ["--config.mesh.data=2"],
            "config.mesh data=2 x fsdp=1 x expert=1 x "
            "tensor=1 needs 2 devices, but there are 4",
        ),
        (
            ["--config.mesh.expert=4", "--config.train.batch_size=30"],
            "train.batch_size=30 is not divisible by the 4 data-parallel shards",
        ),
        (
            [
                "--config.mesh.expert=-1",
                "--config.mesh.data=1",
                "--config.model.num_experts=6",
            ],
            "model.num_experts=6 is not divisible by the expert-parallel size 4",
        ),
        (
            ["--num_processes=2"],
            "needs --coordinator, --num_processes and "
            "--process_id; missing --coordinator, --process_id",
        ),
    ],
)
def test_mesh_errors_from_the_command_line(tmp_path, args, words):
  out = _main(f"--workdir={tmp_path}/w", *args, devices=4)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("eve_jax: error:") and words in last, last
  assert "Traceback" not in out.stderr
