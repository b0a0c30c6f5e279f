"""Fine-tuning models: the EVE backbone plus a head per downstream task.

Each keeps the backbone under the attribute `backbone` (the name the
pretraining model uses), so `eve_jax.pretrained` loads it by path; the
retrieval model's `matching` heads are the pretraining ITC/ITM heads and
load too when the pretraining run had them.

  VQAModel       [image ; question] -> text CLS -> Linear(D, 2D) - LN -
                 GELU - Linear(2D, A) answer logits (paper: a two-layer
                 classifier on the T_cls token).
  NLVR2Model     (image_0, sentence) and (image_1, sentence) as two fused
                 passes -> bi-attention (each sequence attends to the other)
                 -> the two text CLS states -> two-layer classifier.
  RetrievalModel unimodal image / text passes + ITC projections, and ITM on
                 a fused pass (eve_jax/tasks/pretrain.py's itc/itm passes).

Legend: B batch, L = Li + Lt tokens, D width, A answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eve_jax.model.attention import Attention
from eve_jax.model.eve import EVE
from eve_jax.model.heads import MatchingHeads
from eve_jax.model.layers import Dense, LayerNorm, activation_fn
from eve_jax.model.moe import MoEStats
from eve_jax.model.variants import ModelConfig


def fused(
    backbone: EVE,
    images: jax.Array,
    text: jax.Array,
    text_valid: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, list[MoEStats]]:
  """[image ; text] through the backbone.

  Returns:
    (states [B, L, D], valid [B, L] bool, MoE stats); the text CLS is
    states[:, L - Lt].
  """
  img = backbone.embed_image(images)
  txt = backbone.embed_text(text)
  states, stats = backbone.encode(img, txt, text_valid, rng=rng)
  valid = jnp.concatenate([jnp.ones(img.shape[:2], bool), text_valid], 1)
  return states, valid, stats


class ClassifierHead(nnx.Module):
  """[..., D_in] -> Linear(D_in, H) - LayerNorm - GELU - Linear(H, C)."""

  def __init__(
      self,
      d_in: int,
      hidden: int,
      classes: int,
      *,
      eps: float = 1e-6,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.fc1 = Dense(
        d_in, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs
    )
    self.norm = LayerNorm(hidden, eps=eps, dtype=dtype, rngs=rngs)
    self.fc2 = Dense(
        hidden, classes, axes=("mlp", None), dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = activation_fn("gelu")(self.norm(self.fc1(x)))
    return self.fc2(h).astype(jnp.float32)


class VQAModel(nnx.Module):

  def __init__(self, cfg: ModelConfig, num_answers: int, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.backbone = EVE(cfg, rngs=rngs)
    self.vqa_head = ClassifierHead(
        cfg.width,
        2 * cfg.width,
        num_answers,
        eps=cfg.vqa_head_eps,
        dtype=dt,
        rngs=rngs,
    )

  def __call__(self, images, text, text_valid, rng=None):
    """-> ([B, A] float32 answer logits, MoE stats)."""
    states, _, stats = fused(self.backbone, images, text, text_valid, rng)
    cls = states[:, states.shape[1] - text.shape[1]]
    return self.vqa_head(cls), stats


class BiAttentionHead(nnx.Module):
  """The released EVE NLVR2 head (its `--biattn`): each pass's final states
  attend to the other pass's (attn1: 0 -> 1, attn2: 1 -> 0), [attended ;
  own] -> Linear(2D, D) - ReLU per token, attention pooling (scores
  ReLU(Linear(D, 1)), padding -1e4), [pooled_0 ; pooled_1] ->
  Linear(2D, 2). `model.nlvr2_head="biattn"`; loads converted weights."""

  def __init__(self, d: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.attn1 = Attention(d, heads, dtype=dtype, rngs=rngs)
    self.attn2 = Attention(d, heads, dtype=dtype, rngs=rngs)
    self.fc = Dense(2 * d, d, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.pool = Dense(d, 1, axes=("embed", None), dtype=dtype, rngs=rngs)
    self.output = Dense(2 * d, 2, axes=("mlp", None), dtype=dtype, rngs=rngs)

  def _pool(self, f: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, D], softmax-weighted over the valid tokens."""
    score = jax.nn.relu(self.pool(f)[..., 0]).astype(jnp.float32)
    # An additive -1e4, as released (not -inf): identical unless all of a
    # row is padding, which never happens (image tokens are always there).
    score = score - 1e4 * (~valid).astype(jnp.float32)
    w = jax.nn.softmax(score, axis=-1).astype(f.dtype)
    return jnp.einsum("bl,bld->bd", w, f)

  def __call__(self, h0, h1, v0, v1) -> jax.Array:
    """Final states [B, L, D] and valid [B, L] of both passes -> [B, 2]
    float32 logits (false, true)."""
    a0 = self.attn1(h0, v1, kv=h1)
    a1 = self.attn2(h1, v0, kv=h0)
    f0 = jax.nn.relu(self.fc(jnp.concatenate([a0, h0], -1)))
    f1 = jax.nn.relu(self.fc(jnp.concatenate([a1, h1], -1)))
    pooled = jnp.concatenate([self._pool(f0, v0), self._pool(f1, v1)], -1)
    return self.output(pooled).astype(jnp.float32)


class NLVR2Model(nnx.Module):
  """`model.nlvr2_head`: "eve_jax" (below) or "biattn" (`BiAttentionHead`,
  the released head)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    d = cfg.width
    self.cfg = cfg
    self.backbone = EVE(cfg, rngs=rngs)
    if cfg.nlvr2_head == "biattn":
      self.biattn = BiAttentionHead(d, cfg.heads, dtype=dt, rngs=rngs)
      return
    # Bi-attention: sequence 0 attends to 1 (attn0) and 1 to 0 (attn1).
    self.norm0 = LayerNorm(d, dtype=dt, rngs=rngs)
    self.norm1 = LayerNorm(d, dtype=dt, rngs=rngs)
    self.attn0 = Attention(d, cfg.heads, dtype=dt, rngs=rngs)
    self.attn1 = Attention(d, cfg.heads, dtype=dt, rngs=rngs)
    self.classifier = ClassifierHead(2 * d, 2 * d, 2, dtype=dt, rngs=rngs)

  def __call__(self, images0, images1, text, text_valid, rng=None):
    """-> ([B, 2] float32 logits (false, true), MoE stats of both passes)."""
    b = text.shape[0]
    if self.cfg.moe_group == "batch":
      # Two separate passes, as released: each one batch-wide MoE group.
      r0, r1 = (None, None) if rng is None else jax.random.split(rng)
      h0, v0, s0 = fused(self.backbone, images0, text, text_valid, r0)
      h1, v1, s1 = fused(self.backbone, images1, text, text_valid, r1)
      stats = [jax.tree.map(jnp.add, a, c) for a, c in zip(s0, s1)]
    else:
      # Both passes in one batch of 2B rows, each example's two rows side
      # by side ([B, 2, ...] -> [2B, ...]): a device's batch shard then
      # holds both passes of its examples. Concatenating [images0;
      # images1] put them on different devices (GSPMD moved them there
      # and back: 9 all-to-alls and 14 collective-permutes per step on 4
      # TPU chips).
      pair = lambda x0, x1: jnp.stack([x0, x1], 1).reshape(  # noqa: E731
          (2 * b,) + x0.shape[1:]
      )
      states, valid, stats = fused(
          self.backbone,
          pair(images0, images1),
          pair(text, text),
          pair(text_valid, text_valid),
          rng,
      )
      states = states.reshape((b, 2) + states.shape[1:])
      valid = valid.reshape((b, 2) + valid.shape[1:])
      h0, h1 = states[:, 0], states[:, 1]
      v0, v1 = valid[:, 0], valid[:, 1]
    if self.cfg.nlvr2_head == "biattn":
      return self.biattn(h0, h1, v0, v1), stats
    n0, n1 = self.norm0(h0), self.norm1(h1)
    f0 = h0 + self.attn0(n0, v1, kv=n1)
    f1 = h1 + self.attn1(n1, v0, kv=n0)
    # Each pass's text CLS (the position pretraining's ITM reads), now
    # informed by the other image.
    cls = h0.shape[1] - text.shape[1]
    pooled = jnp.concatenate([f0[:, cls], f1[:, cls]], -1)
    return self.classifier(pooled), stats


class RetrievalModel(nnx.Module):
  """The backbone and ITC/ITM heads under the pretraining model's names, so
  `passes.itc_pass` / `passes.itm_pass` run on it as they are."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.backbone = EVE(cfg, rngs=rngs)
    self.matching = MatchingHeads(cfg.width, cfg.width, dtype=dt, rngs=rngs)

  def image_features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, D] image CLS of the image-only pass."""
    bb = self.backbone
    img = bb.embed_image(images)
    empty = jnp.zeros((img.shape[0], 0), jnp.int32)
    states, _ = bb.encode(
        img,
        bb.embed_text(empty),
        jnp.zeros(empty.shape, bool),
        final_norm=self._eval_norm,
    )
    return states[:, 0]

  @property
  def _eval_norm(self) -> bool:
    return self.cfg.retrieval_eval_features == "normed"

  def text_features(self, text: jax.Array, text_valid: jax.Array) -> jax.Array:
    """[B, Lt] -> [B, D] text CLS of the text-only pass."""
    bb = self.backbone
    txt = bb.embed_text(text)
    states, _ = bb.encode(
        txt[:, :0], txt, text_valid, final_norm=self._eval_norm
    )
    return states[:, 0]

  def match_scores(self, images, text, text_valid) -> jax.Array:
    """Fused pass -> [B] ITM log-probability of "match" (reranking)."""
    states, _, _ = fused(self.backbone, images, text, text_valid, None)
    logits = self.matching.match_logits(
        states[:, states.shape[1] - text.shape[1]]
    )
    return jax.nn.log_softmax(logits, -1)[:, 1]
