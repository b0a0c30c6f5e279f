"""The dropless MoE (`moe_dispatch="ragged"`, eve_jax/model/ragged.py)
against references that share none of its code: a float64 computation
that runs every expert on every token and weights by the gates (NumPy for
the forward, a dense float64 JAX function for the gradients), the
capacity dispatchers at a capacity that drops nothing, and itself
unsharded when the batch is split over 4 CPU devices.
"""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from eve_jax import sharding
from eve_jax.model import ragged
from eve_jax.model.moe import ModalityMoE
from eve_jax.model.moe_config import MoEConfig

RULES = sharding.parse_rules(sharding.DEFAULT_RULES)
DIM, HIDDEN, EXPERTS = 16, 32, 4


def _inputs(batch=3, length=20, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, DIM)).astype(np.float32)
  modality = (np.arange(length) >= length // 2).astype(np.int32)
  modality = np.repeat(modality[None], batch, 0)
  valid = rng.random((batch, length)) > 0.2
  return x, modality, valid


def _layer(cfg, seed=0):
  """A layer with non-zero biases (zeros would hide a misplaced bias)."""
  layer = ModalityMoE(DIM, HIDDEN, cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  for name in ("bi", "bo"):
    p = getattr(layer, name)
    p[...] = jnp.asarray(0.1 * rng.normal(size=p[...].shape), jnp.float32)
  return layer


def _value_and_grads(layer, x, modality, valid):
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, modality, valid)
    return jnp.sum(jnp.sin(y)), (y, stats)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (y, stats)), (g_params, g_x) = fn(params, jnp.asarray(x))
  return y, stats, g_params, g_x


def _dense_reference(p, x, modality, valid, choice, keep=None):
  """Every expert on every token, weighted by the gates of the chosen
  experts (`choice` [B, L, K] from the layer: the top-k is a discrete
  decision, not part of what is compared; `keep` [B, L, K] masks the
  choices a bounded buffer dropped). Works on NumPy and jnp."""
  xp = jnp if isinstance(x, jax.Array) else np
  if keep is not None:  # a dropped choice points at no expert
    choice = xp.where(keep, choice, -1)
  one_hot = (modality[..., None] == xp.arange(2)).astype(x.dtype)
  x_m = x + one_hot @ p["modality_embed"]
  logits = x_m @ p["kernel"]
  logits = logits - logits.max(-1, keepdims=True)
  probs = xp.exp(logits) / xp.exp(logits).sum(-1, keepdims=True)
  chosen = (choice[..., None] == xp.arange(EXPERTS)).astype(x.dtype)
  weight = (chosen * probs[..., None, :]).sum(-2) * valid[..., None]
  erf = jax.scipy.special.erf if xp is jnp else np.vectorize(math.erf)
  h = xp.einsum("BLD,EDF->BLEF", x_m, p["wi"]) + p["bi"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  out = xp.einsum("BLEF,EFD->BLED", h, p["wo"]) + p["bo"]
  return xp.einsum("BLED,BLE->BLD", out, weight)


def _params(layer):
  return {
      n: np.asarray(getattr(layer, n)[...], np.float64)
      for n in ("kernel", "modality_embed", "wi", "bi", "wo", "bo")
  }


def _choice(layer, x, modality, valid):
  from eve_jax.model.router import decide

  params = {n: getattr(layer, n)[...] for n in layer.router_params}
  r = decide(
      layer.router,
      params,
      layer.cfg,
      jnp.asarray(x),
      modality,
      jnp.asarray(valid),
      2,
  )
  return np.asarray(r.dispatch.expert_choice)


@pytest.mark.parametrize("backend", ["tiles", "ragged_dot"])
def test_dropless_equals_float64_every_expert_reference(backend):
  """Forward against NumPy float64, gradients of sum(sin(y)) against a
  dense float64 JAX function, both within 1e-5 (relative to the largest
  entry). The expert loads are uneven, so runs straddle tiles."""
  cfg = MoEConfig(EXPERTS, top_k=2, dispatch="ragged", grouped_matmul=backend)
  layer = _layer(cfg)
  x, modality, valid = _inputs()
  y, stats, g_params, g_x = _value_and_grads(layer, x, modality, valid)
  choice = _choice(layer, x, modality, valid)
  assert len(np.unique(np.bincount(choice[valid].ravel()))) > 1  # uneven
  assert float(stats.dropped) == 0
  assert float(stats.routed) == 2 * valid.sum()
  _equals_float64_reference(
      _params(layer), x, modality, valid, choice, None, y, g_params, g_x
  )


def _equals_float64_reference(p64, x, modality, valid, choice, keep, *got):
  """The layer's output `y` and the gradients of sum(sin(y)) (`g_params`,
  `g_x`) against `_dense_reference` in float64 (NumPy forward, JAX
  gradients), within 1e-5 of the largest entry."""
  y, g_params, g_x = got
  y64 = _dense_reference(
      p64, x.astype(np.float64), modality, valid, choice, keep
  )
  scale = np.abs(y64).max()
  np.testing.assert_allclose(np.asarray(y), y64, atol=1e-5 * scale)
  with jax.enable_x64(True):
    j64 = jax.tree.map(jnp.asarray, p64)

    def loss64(p, x):
      out = _dense_reference(
          p,
          x,
          jnp.asarray(modality),
          jnp.asarray(valid, jnp.float64),
          jnp.asarray(choice),
          None if keep is None else jnp.asarray(keep),
      )
      return jnp.sum(jnp.sin(out))

    r_params, r_x = jax.grad(loss64, argnums=(0, 1))(
        j64, jnp.asarray(x, jnp.float64)
    )
    r_params = jax.tree.map(np.asarray, r_params)
    r_x = np.asarray(r_x)
  for name, ref in r_params.items():
    got = np.asarray(g_params[name][...])
    np.testing.assert_allclose(
        got, ref, atol=1e-5 * np.abs(ref).max(), err_msg=name
    )
  np.testing.assert_allclose(
      np.asarray(g_x), r_x, atol=1e-5 * np.abs(r_x).max()
  )


@pytest.mark.parametrize(
    "dispatch", ["gather", pytest.param("einsum", marks=pytest.mark.slow)]
)
def test_dropless_equals_capacity_dispatch_that_drops_nothing(dispatch):
  """capacity_factor 0 (C = S: nothing can drop): the capacity
  dispatchers and the dropless one compute the same layer."""
  x, modality, valid = _inputs(batch=4, length=24, seed=3)
  ref = _value_and_grads(
      _layer(MoEConfig(EXPERTS, dispatch=dispatch, capacity_factor=0)),
      x,
      modality,
      valid,
  )
  assert float(ref[1].dropped) == 0
  for backend in ("tiles", "ragged_dot"):
    cfg = MoEConfig(EXPERTS, dispatch="ragged", grouped_matmul=backend)
    got = _value_and_grads(_layer(cfg), x, modality, valid)
    np.testing.assert_allclose(
        np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6
    )
    for a, b in zip(jax.tree.leaves(got[2:]), jax.tree.leaves(ref[2:])):
      np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
      )


def test_capacity_drops_what_dropless_keeps():
  """At capacity factor 0.5 the gather dispatcher drops assignments of
  this batch, the dropless one none: the outputs differ."""
  x, modality, valid = _inputs(batch=4, length=24, seed=3)
  cap = _value_and_grads(
      _layer(MoEConfig(EXPERTS, capacity_factor=0.5)), x, modality, valid
  )
  dropless = _value_and_grads(
      _layer(MoEConfig(EXPERTS, dispatch="ragged")), x, modality, valid
  )
  assert float(cap[1].dropped) > 0 and float(dropless[1].dropped) == 0
  assert np.abs(np.asarray(cap[0]) - np.asarray(dropless[0])).max() > 1e-3


def test_layout_by_hand():
  """3 tokens x 2 choices over 3 experts, tiles of 2, token 1 padding:
  expert 0 gets (t0, k0), (t2, k1); expert 1 none; expert 2 (t0, k1),
  (t2, k0). Runs padded to 2 rows: expert 0 rows 0-1, expert 2 rows 2-3,
  R = round_up(6, 2) + 3 * 2 = 12 rows, 8 of them past the last run."""
  choice = jnp.array([[0, 2], [1, 2], [2, 0]], jnp.int32)
  valid = jnp.array([True, False, True])
  lay = ragged.layout(choice, valid, num_experts=3, tile=2)
  np.testing.assert_array_equal(lay.slots, [[0, 2], [12, 12], [3, 1]])
  np.testing.assert_array_equal(lay.group_sizes, [2, 0, 2])
  np.testing.assert_array_equal(
      lay.sources, [0, 5, 1, 4] + [6] * 8  # token * K + choice; 6 = none
  )
  np.testing.assert_array_equal(lay.row_expert, [0, 0, 2, 2] + [3] * 8)
  x = jnp.arange(3.0)[:, None] + 1.0  # token t holds t + 1
  np.testing.assert_array_equal(
      ragged.to_buffer(x, lay)[:5, 0], [1.0, 3.0, 1.0, 3.0, 0.0]
  )


def test_auto_tile_keeps_padding_at_most_an_eighth():
  for n, e in ((948, 32), (3424, 8), (121344, 32), (40, 4)):
    tile = ragged.auto_tile(n, e)
    assert 8 <= tile <= 128 and tile & (tile - 1) == 0
    assert e * tile * 8 <= n or tile == 8
  assert ragged.auto_tile(121344, 32) == 128


def _sharded(mesh, cfg, x, modality, valid):
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _layer(cfg)))
  state_sh = sharding.tree_shardings(abstract, mesh, RULES)
  x_sh = sharding.batch_sharding(mesh, RULES, x.shape[0])

  def loss(params, x, modality, valid):
    y, stats = nnx.merge(graphdef, params)(x, modality, valid)
    return jnp.sum(jnp.sin(y)), (y, stats.dropped)

  with sharding.use(mesh, RULES):
    params = jax.device_put(nnx.state(_layer(cfg)), state_sh)
    args = [jax.device_put(jnp.asarray(a), x_sh) for a in (x, modality, valid)]
    fn = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
        in_shardings=(state_sh, x_sh, x_sh, x_sh),
    )
    (_, (y, dropped)), grads = fn(params, *args)
    hlo = fn.lower(params, *args).compile().as_text()
  return y, dropped, grads, hlo


def _mesh(**axes):
  cfg = {**dict(data=1, fsdp=1, expert=1, tensor=1), **axes}
  n = int(np.prod(list(cfg.values())))
  return sharding.make_mesh(cfg, devices=jax.devices()[:n])


def _sharded_equals_one(mesh, cfg, x, modality, valid) -> str:
  """The layer on `mesh` against one device: output and every gradient
  within 1e-5, nothing dropped; the mesh's compiled HLO."""
  y1, d1, g1, _ = _sharded(_mesh(), cfg, x, modality, valid)
  y, d, g, hlo = _sharded(mesh, cfg, x, modality, valid)
  assert float(d1) == float(d) == 0
  for a, b in zip(jax.tree.leaves((y, g)), jax.tree.leaves((y1, g1))):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
    )
  return hlo


@pytest.mark.parametrize(
    "axes",
    [dict(data=4), pytest.param(dict(data=2, fsdp=2), marks=pytest.mark.slow)],
)
def test_dropless_on_4_devices_equals_one(axes):
  """The batch split over 4 CPU devices: each sorts its own tokens (a
  shard_map), the weights' gradients are summed over the devices."""
  cfg = MoEConfig(EXPERTS, dispatch="ragged")
  x, modality, valid = _inputs(batch=8, length=20, seed=5)
  hlo = _sharded_equals_one(_mesh(**axes), cfg, x, modality, valid)
  # The tokens stay where they are: no all-gather or all-to-all of
  # activations, only the weights' gradient all-reduce (and FSDP's
  # weight gathers on fsdp=2).
  assert "all-to-all" not in hlo
  assert "all-reduce" in hlo


@pytest.mark.parametrize(
    "axes,backend",
    [
        (dict(expert=4), "tiles"),
        (dict(expert=4), "ragged_dot"),
        pytest.param(dict(data=2, expert=2), "tiles", marks=pytest.mark.slow),
    ],
)
def test_dropless_with_experts_over_4_devices_equals_one(axes, backend):
  """Experts split over `expert` (ragged_shards.py): each device keeps its
  experts' weights and the tokens go to them and back by the dense
  exchange (CPU's form of the ragged all-to-all). Forward and every
  gradient equal the unsharded layer's; the HLO exchanges activations
  (all-to-all) and gathers no expert weight."""
  cfg = MoEConfig(EXPERTS, top_k=2, dispatch="ragged", grouped_matmul=backend)
  x, modality, valid = _inputs(batch=8, length=20, seed=7)
  hlo = _sharded_equals_one(_mesh(**axes), cfg, x, modality, valid)
  assert "all-to-all" in hlo
  # Expert weights ([E, D, F] and [E, F, D]) never gathered whole.
  for shape in (f"{EXPERTS},{DIM},{HIDDEN}", f"{EXPERTS},{HIDDEN},{DIM}"):
    assert not re.search(rf"\[{shape}\][^\n]*all-gather\(", hlo), shape


def test_dropless_with_too_few_groups_for_the_expert_axes():
  """2 groups cannot split over 4 expert devices (a small evaluation
  batch): that call gathers the experts' weights and runs them all on
  each device's tokens, still equal to one device, gradients included."""
  cfg = MoEConfig(EXPERTS, top_k=2, dispatch="ragged")
  x, modality, valid = _inputs(batch=2, length=20, seed=7)
  hlo = _sharded_equals_one(_mesh(expert=4), cfg, x, modality, valid)
  assert "all-to-all" not in hlo


def test_expert_exchange_by_hand():
  """The route and the dense exchange on 2 devices, worked by hand:
  device 0 has 3 rows for expert 0 and 1 for expert 1, device 1 has 1 and
  2; device j owns expert j. The exchange gathers each device's rows of
  its expert, source-major; the reverse route brings every row home."""
  from eve_jax.model import ragged_shards as rs

  counts = jnp.array([[3, 1], [1, 2]], jnp.int32)
  r0, r1 = (rs.route(counts, jnp.int32(i), 1) for i in range(2))
  np.testing.assert_array_equal(r0.send_off, [0, 3])
  np.testing.assert_array_equal(r0.send_size, [3, 1])
  np.testing.assert_array_equal(r0.dest_off, [0, 0])
  np.testing.assert_array_equal(r1.dest_off, [3, 1])
  np.testing.assert_array_equal(r1.recv_size, [1, 2])
  np.testing.assert_array_equal(r1.recv_off, [0, 1])
  np.testing.assert_array_equal(r1.src_off, [3, 1])
  expert, real = rs.received_experts(counts, jnp.int32(1), 1, 8)
  np.testing.assert_array_equal(real, [1, 1, 1, 0, 0, 0, 0, 0])

  rows = np.array([[10, 11, 12, 13, 0], [20, 21, 22, 0, 0]], np.float32)
  mesh = _mesh(expert=2)

  def move(x):
    me = jax.lax.axis_index("expert")
    r = rs.route(counts, me, 1)
    there = rs.exchange("dense", 8, "expert", x[0], r)
    back = rs.exchange("dense", 5, "expert", there, r.reverse())
    return there[None], back[None]

  there, back = jax.jit(
      jax.shard_map(
          move,
          mesh=mesh,
          in_specs=P("expert"),
          out_specs=(P("expert"), P("expert")),
      )
  )(jnp.asarray(rows))
  np.testing.assert_array_equal(
      there, [[10, 11, 12, 20, 0, 0, 0, 0], [13, 21, 22, 0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(back, rows)


def test_bounded_counts_by_hand():
  """Receive buffers of 4 rows on 2 devices. Device 0 (expert 0) is sent
  runs of 5 and 1: cut to the level 3 (3 + 1 = 4). Device 1 (expert 1)
  runs of 2 and 6: level 2. With 2 experts a device, device 0 is sent
  runs of 1, 4 (source 0) and 2, 0 (source 1): level 2 would take 5 rows,
  level 1 takes 3 (a row left over rather than one run cut below
  another); device 1's runs 0, 0 and 3, 3 take level 2, all 4 rows."""
  from eve_jax.model import ragged_shards as rs

  counts = jnp.array([[5, 2], [1, 6]], jnp.int32)
  kept = rs.bounded_counts(counts, 4, 1, max_count=6)
  np.testing.assert_array_equal(kept, [[3, 2], [1, 2]])
  counts = jnp.array([[1, 4, 0, 0], [2, 0, 3, 3]], jnp.int32)
  kept = rs.bounded_counts(counts, 4, 2, max_count=6)
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [1, 0, 2, 2]])
  # A buffer that holds everything cuts nothing.
  kept = rs.bounded_counts(counts, 8, 2, max_count=6)
  np.testing.assert_array_equal(kept, counts)
  from eve_jax.model.moe import receive_rows

  assert receive_rows(80, 0.75) == 64 and receive_rows(80, 1.0) == 80
  assert receive_rows(81, 1.0) == 88 and receive_rows(80, 0.0) is None


def _bounded_keep(choice, valid, ndev, capacity):
  """NumPy reference of the bounded receive buffer: which (token, choice)
  each of `ndev` batch shards keeps. Per destination device, the level
  is lowered one row at a time from the longest run until the runs it is
  sent fit `capacity`; each (source, expert) run keeps its first tokens.

  Returns:
    ([B, L, K] bool kept, number of valid assignments dropped).
  """
  b, length, k = choice.shape
  c = choice.reshape(ndev, -1, k)
  v = valid.reshape(ndev, -1)
  counts = np.zeros((ndev, EXPERTS), np.int64)
  for s in range(ndev):
    for e in c[s][v[s]].ravel():
      counts[s, e] += 1
  el = EXPERTS // ndev
  allowed = counts.copy()
  for j in range(ndev):
    runs = counts[:, j * el : (j + 1) * el]
    level = runs.max()
    while np.minimum(runs, level).sum() > capacity:
      level -= 1
    allowed[:, j * el : (j + 1) * el] = np.minimum(runs, level)
  keep = np.zeros(c.shape, bool)
  seen = np.zeros_like(counts)
  for s in range(ndev):
    for t in np.flatnonzero(v[s]):
      for i in range(k):
        e = c[s, t, i]
        keep[s, t, i] = seen[s, e] < allowed[s, e]
        seen[s, e] += 1
  return keep.reshape(b, length, k), int((counts - allowed).sum())


def test_bounded_receive_buffer_drops_and_counts_what_it_cuts():
  """Experts over 4 devices with receive buffers of 0.75 x a device's
  assignments (moe_ragged_buffer_factor): the choices past the cut are
  dropped, counted in `dropped`, and what is kept equals the float64
  every-expert reference with the dropped choices' gates 0, forward and
  gradients, within 1e-5."""
  from eve_jax.model.moe import receive_rows

  cfg = MoEConfig(
      EXPERTS, top_k=2, dispatch="ragged", ragged_buffer_factor=0.75
  )
  x, modality, valid = _inputs(batch=8, length=20, seed=7)
  y, dropped, (g_params, g_x), hlo = _sharded(
      _mesh(expert=4), cfg, x, modality, valid
  )
  assert "all-to-all" in hlo
  layer = _layer(cfg)
  choice = _choice(layer, x, modality, valid)
  capacity = receive_rows(2 * 20 * 2, 0.75)  # T = 2 samples x 20 tokens
  keep, want = _bounded_keep(choice, valid, 4, capacity)
  assert want > 0
  assert float(dropped) == want
  _equals_float64_reference(
      _params(layer), x, modality, valid, choice, keep, y, g_params, g_x
  )


def test_unknown_grouped_matmul_is_one_line():
  with pytest.raises(ValueError) as e:
    ModalityMoE(
        DIM,
        HIDDEN,
        MoEConfig(EXPERTS, dispatch="ragged", grouped_matmul="megablocks"),
        rngs=nnx.Rngs(0),
    )
  assert "megablocks" in str(e.value) and "\n" not in str(e.value)


# --- FLOPs: no E x expansion ------------------------------------------------


def _base_layer_train(target=None, batch=16):
  """forward + backward of EVE-Base's soft-router layer with the dropless
  dispatcher over `batch` MLM-pass sequences (1 + 196 + 40 tokens),
  compiled for the host or for one device of `target`; (compiled, XLA's
  analytic train FLOPs)."""
  from eve_jax import config_lib, flops
  from eve_jax.model.variants import ModelConfig

  cfg = ModelConfig.from_config(config_lib.model_config("base"))
  length = 1 + cfg.num_patches + 40
  moe_cfg = dataclasses.replace(cfg.moe, dispatch="ragged")
  layer = nnx.eval_shape(
      lambda: ModalityMoE(cfg.width, cfg.mlp_dim, moe_cfg, rngs=nnx.Rngs(0))
  )
  graphdef, params = nnx.split(layer)

  def loss(params, x, modality, valid):
    y, stats = nnx.merge(graphdef, params)(x, modality, valid)
    return jnp.sum(y) + stats.aux_loss

  args = [
      jax.ShapeDtypeStruct((batch, length, cfg.width), jnp.float32),
      jax.ShapeDtypeStruct((batch, length), jnp.int32),
      jax.ShapeDtypeStruct((batch, length), bool),
  ]
  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  analytic = 3 * batch * flops.moe_layer(cfg, length)  # train = 3 x fwd
  if target is None:
    return fn.lower(params, *args).compile(), analytic
  mesh = sharding.make_mesh(dict(data=1), target.devices[:1])
  with sharding.use(mesh, RULES):
    put = lambda a: jax.ShapeDtypeStruct(  # noqa: E731
        a.shape,
        a.dtype,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )
    compiled = fn.lower(jax.tree.map(put, params), *map(put, args)).compile()
  return compiled, analytic


def _tpu_ragged_dots(hlo: str) -> int:
  """XLA:TPU's ragged dot kernels (custom calls named ragged-dot-*, not
  their metadata) in optimized HLO."""
  return len(re.findall(r"%ragged-dot-(?!metadata)\S* = .*custom-call", hlo))


def test_dot_flops_counts_a_loop_by_its_trip_count():
  """10 [64,128] x [128,256] products in a scan: XLA's cost analysis
  counts the body once, hlo.dot_flops ten times."""
  from eve_jax.aot.hlo import dot_flops

  def f(x, w):
    def body(c, xi):
      return c + jnp.tanh(xi @ w), None

    return jax.lax.scan(body, jnp.zeros((64, 256)), x)[0]

  compiled = jax.jit(f).lower(jnp.ones((10, 64, 128)), jnp.ones((128, 256)))
  hlo = compiled.compile().as_text()
  assert dot_flops(hlo) == 10 * 2 * 64 * 128 * 256


def test_dropless_layer_flops_close_to_active_on_cpu():
  """The "tiles" backend over 16 sequences: the dots XLA runs (counted
  through the scan by its trip count) are within 1.15 x the active FLOPs
  (K experts per token + router), not E x (32 x for EVE-Base)."""
  from eve_jax.aot.hlo import dot_flops

  compiled, analytic = _base_layer_train()
  hlo = compiled.as_text()
  assert " while(" in hlo  # the tile scan
  ratio = dot_flops(hlo) / analytic
  assert 1.0 <= ratio <= 1.15, ratio


def test_dropless_layer_flops_close_to_active_on_v5p():
  """On a v5p chip the experts are XLA's native ragged dot (no loop):
  XLA's own FLOP count is within 1.15 x the active FLOPs."""
  from test_compile import _target_or_skip

  compiled, analytic = _base_layer_train(_target_or_skip("v5p:2x2x1"))
  hlo = compiled.as_text()
  assert _tpu_ragged_dots(hlo) == 6 and " while(" not in hlo  # 2 fwd, 4 bwd
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ratio = float(cost["flops"]) / analytic
  assert 1.0 <= ratio <= 1.15, ratio


# --- the whole step, compiled for a TPU host and a GPU node -----------------


def _ragged_step_hlo(*args):
  from test_compile import _cli

  out = _cli(
      "--config=configs/base.py:tiny",
      "--config.model.moe_dispatch=ragged",
      "--json",
      *args,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~1 min on 2 cores
def test_dropless_step_compiles_for_v5p_with_ragged_dots(tmp_path):
  """tiny pretraining on one v5p host: XLA's ragged dot in the HLO (the
  buffer's rows a multiple of 8: otherwise XLA:TPU expands a ragged dot
  into E dense products by itself), and fewer FLOPs than the capacity
  path's (no capacity padding)."""
  from test_compile import _target_or_skip

  _target_or_skip("v5p:2x2x1")
  hlo = tmp_path / "step.hlo"
  r = _ragged_step_hlo("--topology=v5p:2x2x1", f"--hlo_out={hlo}")
  # 2 layers x 2 passes x (2 forward + 4 backward products)
  assert _tpu_ragged_dots(hlo.read_text()) == 24
  assert r["tpu_kernels"] == {"ragged-dot-none": 24}
  assert r["fits"] and r["estimate_method"] == "xla_tpu_cost_model"
  assert r["xla_over_analytic"] < 1.2  # the gather path: 1.20 at batch 32


@pytest.mark.slow  # ~2 min on 2 cores
def test_dropless_step_compiles_for_gpu_with_tile_sized_dots(tmp_path):
  """tiny pretraining on two H100s: the experts are the row-tile scan
  (XLA:GPU would expand a ragged dot into E dense products): a loop per
  layer, pass and direction, and the dots XLA runs, counted through the
  loops, within 1.2 x the analytic FLOPs of the step (1.04 measured; 4 dense
  products per soft layer, twice its 2 active experts, on about 40% of
  the step's FLOPs would put it near 1.4)."""
  from eve_jax.aot.hlo import dot_flops
  from test_compile import _needs_cuda_plugin

  _needs_cuda_plugin()
  hlo = tmp_path / "step.hlo"
  r = _ragged_step_hlo("--topology=h100x2", f"--hlo_out={hlo}")
  text = hlo.read_text()
  assert text.count(" while(") >= 8  # 2 layers x 2 passes x fwd, bwd
  ratio = dot_flops(text) * r["devices"] / r["flops_per_step_analytic"]
  assert 1.0 <= ratio <= 1.2, ratio


@pytest.mark.slow  # ~2.5 min on 2 cores
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "h100x8"])
def test_dropless_step_with_sharded_experts_compiles(topology, tmp_path):
  """tiny pretraining with the experts over 2 devices of a v5p host and of
  an 8-GPU node: the rows travel by XLA's ragged all-to-all (2 layers x 2
  passes x there and back, forward and backward), the expert weights are
  never gathered (the only all-gathers are of the per-expert counts), and
  on TPU the experts are still ragged dots."""
  from test_compile import _needs_cuda_plugin, _target_or_skip

  if topology.startswith("h100"):
    _needs_cuda_plugin()
  else:
    _target_or_skip(topology)
  hlo = tmp_path / "step.hlo"
  r = _ragged_step_hlo(
      f"--topology={topology}", "--config.mesh.expert=2", f"--hlo_out={hlo}"
  )
  assert r["mesh"]["expert"] == 2 and r["fits"]
  coll = r["collectives"]
  assert coll["ragged-all-to-all"]["count"] == 16
  assert "all-to-all" not in coll
  assert coll.get("all-gather", {"bytes": 0})["bytes"] < 2**16
  if topology.startswith("v5p"):
    assert r["tpu_kernels"] == {"ragged-dot-none": 24}
