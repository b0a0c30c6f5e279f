"""What moving the stack (Python, jax, flax, orbax, grain) must not break.

- A workdir written by the jax 0.10.2 stack (Python 3.11, flax 0.12.8,
  orbax-checkpoint 0.12.8, grain 0.2.18; tests/fixtures/README.md) resumes
  on this one: the orbax checkpoint (parameters, optimizer state) and the
  grain iterator state restore, and the next three steps log what the old
  stack logged for them when it ran on.
- tokamax's ragged_dot (the `kernels` extra), which the grouped expert
  matmul may use, against `jax.lax.ragged_dot` and a float64 NumPy product
  per group, forward and backward.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import REPO, read_jsonl

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OLD_WORKDIR = os.path.join(FIXTURES, "workdir_jax0_10_2")
# The command that made the fixture (with `--config.train.steps=6`; its
# step-6 checkpoint and the rows of steps 4-6 were then taken out).
OLD_ARGS = [
    "--config=configs/base.py:tiny",
    "--config.model.depth=2",
    "--config.model.decoder_depth=1",
    "--config.model.width=32",
    "--config.model.heads=2",
    "--config.model.mlp_dim=64",
    "--config.model.decoder_width=32",
    "--config.model.decoder_heads=2",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=10",
    "--config.train.eval_every=0",
    "--config.train.eval_examples=8",
    "--config.train.eval_batch_size=8",
    "--config.train.viz=False",
    "--config.data.num_tokenizer_captions=500",
    "--config.train.steps=6",
]


def test_a_workdir_of_the_jax_0_10_2_stack_resumes_where_it_stopped(
    tmp_path,
):
  """The old stack's step-3 checkpoint resumed to step 6 by this stack:
  steps 4-6 within float rounding of the old stack's own steps 4-6.

  A data iterator that restarted instead of restoring would feed step 4
  the batch of step 1, and parameters or optimizer moments that did not
  restore would move the loss by far more than the 1e-5 allowed."""
  wd = str(tmp_path / "w")
  shutil.copytree(OLD_WORKDIR, wd)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "eve_jax.main", *OLD_ARGS, f"--workdir={wd}"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr and "at step 3" in out.stderr
  rows = {r["step"]: r for r in read_jsonl(f"{wd}/metrics.jsonl")}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  old = read_jsonl(os.path.join(FIXTURES, "workdir_jax0_10_2.steps4to6.jsonl"))
  assert [r["step"] for r in old] == [4, 5, 6]
  for r in old:
    for key in ("loss", "mlm_loss", "mim_loss", "aux_loss", "grad_norm"):
      np.testing.assert_allclose(
          rows[r["step"]][key], r[key], rtol=1e-5, err_msg=f"{key}@{r['step']}"
      )
    # Accuracy counts tokens: the same batch gives the same count.
    assert rows[r["step"]]["mlm_acc"] == pytest.approx(r["mlm_acc"], abs=1e-6)
  assert sorted(os.listdir(f"{wd}/checkpoints")) == ["3", "6"]


def _group_rows(sizes):
  """(g, the rows of group g) for consecutive groups of `sizes` rows."""
  start = 0
  for g, n in enumerate(sizes):
    yield g, slice(start, start + n)
    start += n


def test_tokamax_ragged_dot_matches_lax_and_a_float64_product():
  """Uneven groups, an empty one and rows past the last group, float32:
  the product and both gradients of a weighted sum."""
  if os.environ.get("EVE_JAX_REQUIRE_KERNELS") == "1":
    import tokamax  # pylint: disable=g-import-not-at-top
  else:
    tokamax = pytest.importorskip(
        "tokamax", reason="pip install -e '.[kernels]'"
    )
  rng = np.random.default_rng(0)
  g, m, k, n = 4, 96, 32, 48
  lhs = rng.standard_normal((m, k)).astype(np.float32)
  rhs = rng.standard_normal((g, k, n)).astype(np.float32)
  cot = rng.standard_normal((m, n)).astype(np.float32)
  sizes = np.array([40, 0, 17, 31], np.int32)  # 8 rows past the groups
  # By hand, in float64: group g's rows times rhs[g]; rows past the groups
  # are 0. The gradients of sum(out * cot): d/dlhs = cot @ rhs[g]^T on
  # group g's rows, d/drhs[g] = lhs_g^T cot_g; rows past the groups get none.
  l64, r64, c64 = (x.astype(np.float64) for x in (lhs, rhs, cot))
  ref, dl, dr = np.zeros((m, n)), np.zeros((m, k)), np.zeros((g, k, n))
  for i, rows in _group_rows(sizes):
    ref[rows] = l64[rows] @ r64[i]
    dl[rows] = c64[rows] @ r64[i].T
    dr[i] = l64[rows].T @ c64[rows]

  def loss(f):
    return lambda a, b: jnp.sum(f(a, b, jnp.asarray(sizes)) * cot)

  ours = jax.jit(tokamax.ragged_dot)(lhs, rhs, sizes)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(ours)[88:], 0.0)
  lax = jax.lax.ragged_dot(lhs, rhs, sizes)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(lax), atol=1e-5)
  ga = jax.grad(loss(tokamax.ragged_dot), argnums=(0, 1))(lhs, rhs)
  gb = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
  for got, other, want in zip(ga, gb, (dl, dr)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(other), rtol=1e-5, atol=1e-5
    )
