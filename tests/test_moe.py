"""moe, router and dispatch: routing by hand, float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax.model import dispatch, moe, router
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.variants import ModelConfig

_ERF = np.vectorize(math.erf)


# ---------------------------------------------------------------------------
# Independent float64 numpy references.
# ---------------------------------------------------------------------------


def np_act(x, name):
  if name == "gelu":
    return 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0)))
  return x / (1.0 + np.exp(-1.702 * x))


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_params(layer, names):
  return {n: np.asarray(getattr(layer, n)[...], np.float64) for n in names}


def moe_reference(p, x, modality, valid, top_k, capacity, add_modality, act):
  """Runs every expert on every token; keeps top-k choices that fit capacity."""
  x = np.asarray(x, np.float64)
  b, s, _ = x.shape
  e = p["kernel"].shape[1]
  x_m = x + p["modality_embed"][modality]
  probs = np_softmax(x_m @ p["kernel"])  # [B, L, E]
  choice = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  x_in = x_m if add_modality else x
  # [B, L, E, D]: every expert on every token.
  h = np_act(np.einsum("bld,edf->blef", x_in, p["wi"]) + p["bi"], act)
  ffn = np.einsum("blef,efd->bled", h, p["wo"]) + p["bo"]
  y = np.zeros_like(x)
  kept = np.zeros((b, s, top_k), bool)
  for g in range(b):
    fill = np.zeros(e, int)
    for k in range(top_k):  # priority: all top-1 choices, then all top-2, ...
      for t in range(s):
        if not valid[g, t]:
          continue
        ex = choice[g, t, k]
        if fill[ex] < capacity:
          fill[ex] += 1
          kept[g, t, k] = True
          y[g, t] += probs[g, t, ex] * ffn[g, t, ex]
  v = valid.astype(bool)
  p_mean = probs[v].mean(0)
  f = np.bincount(choice[v].ravel(), minlength=e) / choice[v].size
  aux = e * np.sum(f * p_mean)
  counts = np.zeros((p["modality_embed"].shape[0], e))
  for g, t in zip(*np.nonzero(v)):
    for ex in choice[g, t]:
      counts[modality[g, t], ex] += 1
  dropped = v.sum() * top_k - kept.sum()
  return y, aux, dropped, counts


def ffn_reference(p, x, modality, act):
  """Each modality's LN + FFN run on that modality's tokens only."""
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    for m in range(p["wi"].shape[0]):
      idx = np.nonzero(modality[g] == m)[0]
      t = x[g, idx]
      t = t - t.mean(-1, keepdims=True)
      t = t / np.sqrt(np.mean(t**2, -1, keepdims=True) + 1e-6)
      t = t * p["norm_scale"][m] + p["norm_bias"][m]
      t = np_act(t @ p["wi"][m] + p["bi"][m], act) @ p["wo"][m] + p["bo"][m]
      y[g, idx] = t
  return y


def randomize(layer, rng, scales):
  """Replaces parameters with random values large enough to matter."""
  for name, scale in scales.items():
    param = getattr(layer, name)
    param.set_value(
        jnp.asarray(rng.normal(size=param.shape) * scale, param.dtype)
    )


def moe_scales(d, f):
  return {
      "kernel": 1.0,
      "modality_embed": 0.5,
      "wi": d**-0.5,
      "bi": 0.1,
      "wo": f**-0.5,
      "bo": 0.1,
  }


MOE_PARAMS = ("kernel", "modality_embed", "wi", "bi", "wo", "bo")
FFN_PARAMS = ("norm_scale", "norm_bias", "wi", "bi", "wo", "bo")


# ---------------------------------------------------------------------------
# Pure pieces.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s,e,k,cf,expected",
    [
        (6, 2, 1, 1.0, 3),
        (6, 2, 1, 0.6, 2),
        (4, 3, 2, 0.7, 2),
        (237, 32, 2, 1.25, 19),  # EVE-Base soft layer: 197 image + 40 text
        (1, 32, 1, 1.0, 1),  # at least one slot
        (10, 4, 2, 0.0, 10),  # <= 0: no dropping
        (10, 4, 2, -1.0, 10),
        (4, 2, 2, 4.0, 4),  # capped at S: no expert can get more
    ],
)
def test_expert_capacity(s, e, k, cf, expected):
  assert router.expert_capacity(s, e, k, cf) == expected


@pytest.mark.parametrize(
    "s,expected",
    [
        (3 * 237, 45),  # a released VQA batch of 3 at 224 px: ceil(1422 / 32)
        (60, 4),  # ceil(120 / 32) = 4 anyway
        (40, 4),  # ceil(80 / 32) = 3, raised to the minimum 4
        (3, 3),  # the minimum capped at S: 3 tokens fill no more
    ],
)
def test_expert_capacity_minimum(s, expected):
  """DeepSpeed's min_capacity (4 in the released EVE): max(ceil(2 S / E),
  4) slots, capped at S as always."""
  assert router.expert_capacity(s, 32, 2, 1.0, min_capacity=4) == expected


@pytest.mark.parametrize("name", ["gelu", "quick_gelu"])
def test_activations(name):
  x = np.linspace(-4, 4, 33)
  got = np.asarray(moe.gelu_fn(name)(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, np_act(x, name), atol=1e-6)


def test_activation_unknown_name():
  with pytest.raises(ValueError, match="activation"):
    moe.gelu_fn("relu")


# Hand-worked routing cases. probs are the router probabilities (logits =
# log probs); `kept` lists (token, expert, slot) of the kept assignments in the
# priority order top-1 of every token, then top-2 of every token.
ROUTE_CASES = {
    # E=2, K=1, C=2. Top-1 experts 0,0,1,0,1,1: t3 (3rd at e0) and t5 (3rd at
    # e1) are dropped.
    "k1": dict(
        probs=[
            [0.9, 0.1],
            [0.8, 0.2],
            [0.3, 0.7],
            [0.6, 0.4],
            [0.2, 0.8],
            [0.4, 0.6],
        ],
        valid=[1, 1, 1, 1, 1, 1],
        top_k=1,
        capacity=2,
        cf=0.6,
        kept=[(0, 0, 0), (1, 0, 1), (2, 1, 0), (4, 1, 1)],
        dropped=2,
        routed=6,
    ),
    # Same, t1 is padding: it takes no slot, so t3 now fits; t5 still dropped.
    "k1_pad": dict(
        probs=[
            [0.9, 0.1],
            [0.8, 0.2],
            [0.3, 0.7],
            [0.6, 0.4],
            [0.2, 0.8],
            [0.4, 0.6],
        ],
        valid=[1, 0, 1, 1, 1, 1],
        top_k=1,
        capacity=2,
        cf=0.6,
        kept=[(0, 0, 0), (2, 1, 0), (3, 0, 1), (4, 1, 1)],
        dropped=1,
        routed=5,
    ),
    # E=3, K=2, C=2. Top-1: t0->e0@0, t1->e0@1, t2->e0 DROP, t3->e1@0.
    # Top-2: t0->e1@1, t1->e2@0, t2->e1 DROP (t3's top-1 came first),
    # t3->e0 DROP. Token order (not priority) would have kept t2->e1.
    # t2 loses both choices, so its MoE output is 0.
    "k2": dict(
        probs=[
            [0.5, 0.3, 0.2],
            [0.6, 0.1, 0.3],
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],
        ],
        valid=[1, 1, 1, 1],
        top_k=2,
        capacity=2,
        cf=0.7,
        kept=[(0, 0, 0), (1, 0, 1), (3, 1, 0), (0, 1, 1), (1, 2, 0)],
        dropped=3,
        routed=8,
    ),
    # Same, t0 is padding. Top-1: t1->e0@0, t2->e0@1, t3->e1@0.
    # Top-2: t1->e2@0, t2->e1@1, t3->e0 DROP.
    "k2_pad": dict(
        probs=[
            [0.5, 0.3, 0.2],
            [0.6, 0.1, 0.3],
            [0.7, 0.2, 0.1],
            [0.3, 0.6, 0.1],
        ],
        valid=[0, 1, 1, 1],
        top_k=2,
        capacity=2,
        cf=0.7,
        kept=[(1, 0, 0), (2, 0, 1), (3, 1, 0), (1, 2, 0), (2, 1, 1)],
        dropped=1,
        routed=6,
    ),
}


def _expected_dispatch(case):
  probs = np.asarray(case["probs"])
  s, e = probs.shape
  dispatch = np.zeros((1, s, e, case["capacity"]), bool)
  combine = np.zeros((1, s, e, case["capacity"]), np.float32)
  for t, ex, c in case["kept"]:
    dispatch[0, t, ex, c] = True
    combine[0, t, ex, c] = probs[t, ex]  # raw gate, not renormalized
  return dispatch, combine


@pytest.mark.parametrize("name", sorted(ROUTE_CASES))
def test_route_by_hand(name):
  case = ROUTE_CASES[name]
  logits = jnp.log(jnp.asarray(case["probs"], jnp.float32))[None]
  valid = jnp.asarray(case["valid"], bool)[None]
  d = router.route(logits, valid, case["top_k"], case["capacity"])
  dispatch, combine = _expected_dispatch(case)
  np.testing.assert_array_equal(np.asarray(d.dispatch), dispatch)
  np.testing.assert_allclose(np.asarray(d.combine), combine, atol=1e-6)
  assert int(np.sum(np.asarray(d.kept))) == len(case["kept"])


@pytest.mark.parametrize("name", sorted(ROUTE_CASES))
def test_moe_stats_by_hand(name):
  """The layer with logits = log(probs) reports the hand-counted drops."""
  case = ROUTE_CASES[name]
  probs = np.asarray(case["probs"], np.float32)
  s, e = probs.shape
  capacity = router.expert_capacity(s, e, case["top_k"], case["cf"])
  assert capacity == case["capacity"]
  layer = moe.ModalityMoE(
      e,
      4,
      MoEConfig(e, case["top_k"], capacity_factor=case["cf"]),
      rngs=nnx.Rngs(0),
  )
  layer.kernel.set_value(jnp.eye(e))
  layer.modality_embed.set_value(jnp.zeros_like(layer.modality_embed[...]))
  valid = jnp.asarray(case["valid"], bool)[None]
  y, stats = layer(
      jnp.log(jnp.asarray(probs))[None], jnp.zeros((1, s), jnp.int32), valid
  )
  assert float(stats.dropped) == case["dropped"]
  assert float(stats.routed) == case["routed"]
  kept_tokens = {t for t, _, _ in case["kept"]}
  for t in range(s):
    is_zero = not np.any(np.asarray(y[0, t]))
    assert is_zero == (t not in kept_tokens), t


def test_route_groups_are_independent():
  a, b = ROUTE_CASES["k2"], ROUTE_CASES["k2_pad"]
  logits = jnp.log(jnp.asarray([a["probs"], b["probs"]], jnp.float32))
  valid = jnp.asarray([a["valid"], b["valid"]], bool)
  d = router.route(logits, valid, 2, 2)
  for g, case in enumerate((a, b)):
    dispatch, combine = _expected_dispatch(case)
    np.testing.assert_array_equal(np.asarray(d.dispatch[g]), dispatch[0])
    np.testing.assert_allclose(np.asarray(d.combine[g]), combine[0], atol=1e-6)


# ---------------------------------------------------------------------------
# Load-balancing loss (eq. 7).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs,choice,valid,alpha,expected",
    [
        # E=2, K=1; t3 is padding. f = [2/3, 1/3], p = [1.7/3, 1.3/3]:
        # 2 * (2/3 * 1.7/3 + 1/3 * 1.3/3) = 9.4/9. Counting t3 would give 1.0.
        (
            [[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]],
            [[0], [0], [1], [1]],
            [1, 1, 1, 0],
            0.01,
            0.01 * 9.4 / 9,
        ),
        # E=3, K=2. counts [1, 2, 1] -> f = [.25, .5, .25]; p = [.3, .25, .45]:
        # 3 * (.075 + .125 + .1125) = .9375.
        (
            [[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]],
            [[0, 1], [2, 1]],
            [1, 1],
            1.0,
            0.9375,
        ),
        # Uniform choices (f = 1/E) with skewed p: exactly alpha.
        (
            [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
            [[0, 1], [2, 3]],
            [1, 1],
            0.5,
            0.5,
        ),
    ],
)
def test_load_balancing_loss_by_hand(probs, choice, valid, alpha, expected):
  got = router.load_balancing_loss(
      jnp.asarray(probs, jnp.float32)[None],
      jnp.asarray(choice, jnp.int32)[None],
      jnp.asarray(valid, bool)[None],
      alpha,
  )
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize("e,k", [(4, 1), (4, 2), (32, 2)])
def test_load_balancing_loss_uniform_router_gives_alpha(e, k):
  logits = jnp.zeros((2, 5, e))
  valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  d = router.route(logits, valid, k, router.expert_capacity(5, e, k, 1.0))
  got = router.load_balancing_loss(d.probs, d.expert_choice, valid, 0.001)
  np.testing.assert_allclose(float(got), 0.001, rtol=1e-6)


# ---------------------------------------------------------------------------
# ModalityMoE against the dense float64 reference.
# ---------------------------------------------------------------------------

B, L, D, F = 3, 7, 8, 16
MODALITY = np.array(
    [
        [0, 0, 0, 0, 1, 1, 1],
        [1, 0, 1, 0, 0, 1, 0],  # interleaved
        [1, 1, 1, 0, 0, 0, 0],
    ]
)  # text first
VALID = np.array(
    [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 0, 1, 1, 1, 1],  # padding in the middle
        [1, 1, 0, 0, 1, 1, 1],
    ],
    bool,
)


@pytest.mark.parametrize(
    "e,k,cf,add,act",
    [
        (4, 1, 0.0, True, "gelu"),
        (4, 2, 100.0, True, "quick_gelu"),
        (8, 2, -1.0, False, "gelu"),
        (3, 3, 0.0, True, "gelu"),
        (4, 2, 0.5, True, "gelu"),  # capacity 2: drops
        (6, 1, 0.6, False, "quick_gelu"),  # capacity 1: drops
    ],
)
def test_moe_matches_dense_reference(e, k, cf, add, act):
  layer = moe.ModalityMoE(
      D,
      F,
      MoEConfig(
          e,
          k,
          capacity_factor=cf,
          add_modality_to_experts=add,
          aux_loss_weight=0.01,
          activation=act,
      ),
      rngs=nnx.Rngs(1),
  )
  rng = np.random.default_rng(e * 10 + k)
  randomize(layer, rng, moe_scales(D, F))
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  y, stats = jax.jit(lambda m, *a: m(*a))(
      layer,
      jnp.asarray(x),
      jnp.asarray(MODALITY, jnp.int32),
      jnp.asarray(VALID),
  )
  capacity = router.expert_capacity(L, e, k, cf)
  y_ref, aux, dropped, counts = moe_reference(
      np_params(layer, MOE_PARAMS), x, MODALITY, VALID, k, capacity, add, act
  )
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(y)[~VALID])  # padding gives exactly 0
  np.testing.assert_allclose(float(stats.aux_loss), 0.01 * aux, rtol=1e-5)
  assert float(stats.dropped) == dropped
  assert (dropped > 0) == (0 < cf < 1)  # the case table means what it says
  assert float(stats.routed) == k * VALID.sum()
  np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)


@pytest.mark.parametrize("b_nonzero,changes", [(True, True), (False, False)])
def test_add_modality_to_experts_switch(b_nonzero, changes):
  layer = moe.ModalityMoE(
      D, F, MoEConfig(4, 2, capacity_factor=0.0), rngs=nnx.Rngs(2)
  )
  rng = np.random.default_rng(3)
  randomize(layer, rng, moe_scales(D, F))
  if not b_nonzero:
    layer.modality_embed.set_value(jnp.zeros_like(layer.modality_embed[...]))
  args = (
      jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32),
      jnp.asarray(MODALITY, jnp.int32),
      jnp.asarray(VALID),
  )
  y_on, stats_on = layer(*args)
  layer.router = router.ModalityRouter(add_modality_to_experts=False)
  y_off, stats_off = layer(*args)
  # The router always sees x + b_m: the routing is the same either way.
  np.testing.assert_array_equal(
      np.asarray(stats_on.expert_counts), np.asarray(stats_off.expert_counts)
  )
  diff = float(jnp.max(jnp.abs(y_on - y_off)))
  assert (diff > 1e-3) == changes, diff


def test_moe_bfloat16_experts_float32_router():
  layer = moe.ModalityMoE(
      D,
      F,
      MoEConfig(4, 2, capacity_factor=0.0),
      dtype=jnp.bfloat16,
      rngs=nnx.Rngs(4),
  )
  rng = np.random.default_rng(5)
  randomize(layer, rng, moe_scales(D, F))
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  y, stats = layer(
      jnp.asarray(x), jnp.asarray(MODALITY, jnp.int32), jnp.asarray(VALID)
  )
  assert y.dtype == jnp.bfloat16 and stats.aux_loss.dtype == jnp.float32
  y_ref, _, _, counts = moe_reference(
      np_params(layer, MOE_PARAMS), x, MODALITY, VALID, 2, L, True, "gelu"
  )
  np.testing.assert_array_equal(np.asarray(stats.expert_counts), counts)
  np.testing.assert_allclose(
      np.asarray(y, np.float32), y_ref, atol=0.05, rtol=0.05
  )


def test_moe_grad_reaches_router_and_modality_embed():
  layer = moe.ModalityMoE(D, F, MoEConfig(4, 2), rngs=nnx.Rngs(6))
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(0), (B, L, D))
  modality = jnp.asarray(MODALITY, jnp.int32)
  valid = jnp.asarray(VALID)

  @jax.jit
  def grad_fn(params):
    def loss(params):
      y, stats = nnx.merge(graphdef, params)(x, modality, valid)
      return jnp.sum(y**2) + stats.aux_loss

    return jax.grad(loss)(params)

  grads = grad_fn(params)
  for name in ("kernel", "wi", "wo"):
    g = np.asarray(grads[name][...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  g_embed = np.asarray(grads["modality_embed"][...])
  assert np.all(np.abs(g_embed).sum(-1) > 0)  # both modalities get gradient


def test_logical_axis_names():
  layer = moe.ModalityMoE(D, F, MoEConfig(4, 2), rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs["wi"].get_value()) == ("expert", "embed", "mlp")
  assert tuple(specs["wo"].get_value()) == ("expert", "mlp", "embed")
  assert tuple(specs["kernel"].get_value()) == ("embed", None)


# ---------------------------------------------------------------------------
# ModalityFFN (hard router).
# ---------------------------------------------------------------------------


def _modality_rows(order, counts, batch, rng):
  base = np.concatenate([np.full(n, m) for m, n in enumerate(counts)])
  if order == "sorted":
    rows = [base] * batch
  elif order == "reversed":
    rows = [base[::-1]] * batch
  else:  # a different arbitrary interleaving in every row
    rows = [rng.permutation(base) for _ in range(batch)]
  return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("counts", [(5, 3), (2, 3, 3)])
@pytest.mark.parametrize("order", ["sorted", "reversed", "interleaved"])
@pytest.mark.parametrize("use_counts", [True, False])
def test_modality_ffn_matches_per_modality_reference(counts, order, use_counts):
  m = len(counts)
  layer = moe.ModalityFFN(
      D, F, num_modalities=m, activation="gelu", rngs=nnx.Rngs(7)
  )
  rng = np.random.default_rng(8)
  randomize(
      layer,
      rng,
      {
          "norm_scale": 1.0,
          "norm_bias": 0.5,
          "wi": D**-0.5,
          "bi": 0.1,
          "wo": F**-0.5,
          "bo": 0.1,
      },
  )
  modality = _modality_rows(order, counts, B, rng)
  x = rng.normal(size=(B, sum(counts), D)).astype(np.float32) * 2 + 1
  y = jax.jit(lambda l, x, mod: l(x, mod, counts if use_counts else None))(
      layer, jnp.asarray(x), jnp.asarray(modality)
  )
  y_ref = ffn_reference(np_params(layer, FFN_PARAMS), x, modality, "gelu")
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)


def test_modality_ffn_bad_counts():
  layer = moe.ModalityFFN(D, F, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="counts"):
    layer(jnp.zeros((1, 6, D)), jnp.zeros((1, 6), jnp.int32), (3, 2))


def test_modality_ffn_gather_costs_one_ffn_per_token():
  d, f, counts = 64, 256, (30, 10)
  layer = moe.ModalityFFN(d, f, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  x = jnp.zeros((2, sum(counts), d))
  modality = jnp.asarray(
      _modality_rows("interleaved", counts, 2, np.random.default_rng(0))
  )

  def flops(c):
    fn = lambda p, x, mod: nnx.merge(graphdef, p)(x, mod, c)
    cost = jax.jit(fn).lower(params, x, modality).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  gather, fallback = flops(counts), flops(None)
  ffn_flops = 2 * 2 * 2 * sum(counts) * d * f  # two matmuls, 2 flops/MAC
  assert gather < 0.6 * fallback, (gather, fallback)
  assert gather < 1.3 * ffn_flops, (gather, ffn_flops)


# ---------------------------------------------------------------------------
# Router and dispatcher interfaces: chosen by config, one file each.
# ---------------------------------------------------------------------------


def _soft_layer_from_config(**model_keys):
  """A soft-router layer built as EVE builds it: from config.model keys
  through ModelConfig.moe, nothing else."""
  cfg = ModelConfig.from_config(dict(variant="tiny", **model_keys))
  layer = moe.ModalityMoE(D, F, cfg.moe, rngs=nnx.Rngs(7))
  randomize(
      layer,
      np.random.default_rng(8),
      {
          k: v
          for k, v in moe_scales(D, F).items()
          if k in layer.router_params or k in ("wi", "bi", "wo", "bo")
      },
  )
  return layer


def test_the_plain_router_is_chosen_by_config_and_ignores_modality():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(B, L, D)), jnp.float32)
  valid = jnp.asarray(VALID)
  ids = jnp.asarray(MODALITY, jnp.int32)
  flipped = 1 - ids  # every token claims the other modality

  plain = _soft_layer_from_config(moe_router="plain")
  assert isinstance(plain.router, router.PlainRouter)
  assert plain.router_params == ("kernel",)
  assert "modality_embed" not in nnx.to_pure_dict(nnx.state(plain))
  y1, s1 = plain(x, ids, valid)
  y2, s2 = plain(x, flipped, valid)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  np.testing.assert_array_equal(
      np.asarray(s1.expert_counts).sum(0), np.asarray(s2.expert_counts).sum(0)
  )

  default = _soft_layer_from_config()
  assert isinstance(default.router, router.ModalityRouter)
  y1, _ = default(x, ids, valid)
  y2, _ = default(x, flipped, valid)
  assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-3


def test_a_router_name_that_does_not_exist_is_one_line():
  with pytest.raises(
      ValueError,
      match=r"model.moe_router='modallity' is "
      r"not one of \['modality', 'plain'\]",
  ):
    ModelConfig.from_config(dict(variant="tiny", moe_router="modallity"))
  with pytest.raises(ValueError, match="router 'x' is not one of"):
    router.make_router(MoEConfig(router="x"))


def test_the_whole_model_takes_the_router_from_config():
  """EVE built from config.model.moe_router="plain": no soft layer has a
  modality embedding; the hard-router layers are untouched."""
  from eve_jax.model.eve import EVE  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig.from_config(dict(variant="tiny", moe_router="plain"))
  params = nnx.to_pure_dict(
      nnx.state(nnx.eval_shape(lambda: EVE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  )
  soft = [b for i, b in params["blocks"].items() if cfg.soft_layer(int(i))]
  assert len(soft) == cfg.num_soft_layers
  for block in soft:
    assert set(block["ffn"]) == {"kernel", "wi", "bi", "wo", "bo"}


def test_dispatchers_agree_through_the_interface():
  """gather and einsum (dispatch.DISPATCHERS) on one routing decision with
  drops: the same buffer, the same combined output, the same gradients."""
  rng = np.random.default_rng(10)
  e, k, s, dim = 4, 2, 9, 5
  logits = jnp.asarray(rng.normal(size=(2, s, e)), jnp.float32)
  valid = jnp.asarray(rng.random((2, s)) > 0.2)
  capacity = 3  # < K * S / E: some assignments are dropped
  d = router.route(logits, valid, k, capacity)
  assert int(jnp.sum(d.kept)) < k * int(jnp.sum(valid))
  x = jnp.asarray(rng.normal(size=(2, s, dim)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(e, dim, dim)), jnp.float32)

  def run(name, x, w):
    disp = dispatch.make_dispatcher(name)
    plan = disp.plan(d, e, capacity)
    buf = disp.dispatch(x, plan)
    return buf, disp.combine(jnp.einsum("EGCD,EDF->EGCF", buf, w), plan)

  (buf_g, y_g), (buf_e, y_e) = run("gather", x, w), run("einsum", x, w)
  np.testing.assert_allclose(np.asarray(buf_g), np.asarray(buf_e), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y_g), np.asarray(y_e), atol=1e-5)
  grads = [
      jax.grad(
          lambda x, w, n=n: jnp.sum(jnp.sin(run(n, x, w)[1])), argnums=(0, 1)
      )(x, w)
      for n in ("gather", "einsum")
  ]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match="dispatch: expected one of"):
    dispatch.make_dispatcher("scatter")


def test_a_run_trains_with_the_plain_router_by_config_only(tmp_path):
  """--config.model.moe_router=plain, nothing else: the run's checkpoint
  has no modality embedding in its soft layers, and the loss is finite."""
  from eve_jax import config_lib, pretrained, trainer  # pylint: disable=g-import-not-at-top

  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.model.update(dict(depth=2, decoder_depth=1, moe_router="plain"))
  c.train.update(
      dict(
          steps=2,
          batch_size=8,
          log_every=1,
          eval_every=0,
          checkpoint_every=2,
          eval_examples=8,
          eval_batch_size=8,
          viz=False,
      )
  )
  c.data.num_tokenizer_captions = 500
  out = trainer.run(c, str(tmp_path))
  assert np.isfinite(out.eval["mlm_acc"])
  params, _ = pretrained.load_params(str(tmp_path))
  ffns = [b["ffn"] for b in params["backbone"]["blocks"].values()]
  assert len(ffns) == 2 and all("modality_embed" not in f for f in ffns)
  assert all("kernel" in f for f in ffns)  # both soft: depth 2, 2 soft
