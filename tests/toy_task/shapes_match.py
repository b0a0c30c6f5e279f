"""A task outside eve_jax, written against eve_jax/tasks/contract.py only:
image-text matching as binary classification on EVE-Shapes.

Each training batch of B captioned images gives 2B pairs: (image i, its
caption) labelled 1 and (image i, caption i+1) labelled 0; the text CLS of
the fused pass goes through a linear layer to 2 logits. eval.json gets
`match_acc` over the held-out EVE-Shapes images. Run it with
`config.task = "shapes_match:ShapesMatch"` and this folder on PYTHONPATH
(tests/toy_task/config.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eve_jax import flops, optim, sharding
from eve_jax.data import run_tokenizer, sources, specs
from eve_jax.model.eve import EVE
from eve_jax.model.layers import Dense
from eve_jax.model.variants import ModelConfig
from eve_jax.model.passes import moe_metrics, sum_moe_stats


class MatchModel(nnx.Module):
  """EVE + Linear(D, 2) on the text CLS of [image ; text]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.backbone = EVE(cfg, rngs=rngs)
    self.head = Dense(cfg.width, 2, axes=("embed", None), rngs=rngs)

  def __call__(self, image, text, text_valid, rng=None):
    """-> ([B, 2] logits, MoE stats)."""
    img = self.backbone.embed_image(image)
    states, stats = self.backbone.encode(
        img, self.backbone.embed_text(text), text_valid, rng=rng
    )
    return self.head(states[:, img.shape[1]]).astype(jnp.float32), stats


def _pairs(batch):
  """[B] images and captions -> [2B] pairs: matched, then each image with
  the next row's caption; labels [2B] int32 (1 = matched)."""

  def both(x):
    return jnp.concatenate([x, x])

  def shifted(x):
    return jnp.concatenate([x, jnp.roll(x, -1, axis=0)])

  b = batch["image"].shape[0]
  labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(b, jnp.int32)])
  return (
      both(batch["image"]),
      shifted(batch["text"]),
      shifted(batch["text_valid"]),
      labels,
  )


def _logits_and_labels(model, batch, rng=None):
  image, text, valid, labels = _pairs(batch)
  logits, stats = model(image, text, valid, rng=rng)
  return logits, labels, sum_moe_stats(stats)


class ShapesMatch:
  """The contract's methods, in its order."""

  name = "shapes_match"

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.model_cfg = ModelConfig.from_config(
        config.model, vocab_size=tokenizer.vocab_size
    )
    self.steps = config.train.steps

  @classmethod
  def check(cls, config, workdir):
    del workdir
    ModelConfig.from_config(config.model)

  @classmethod
  def setup(cls, config, workdir, is_main):
    del is_main
    return cls(config, run_tokenizer.build_tokenizer(config, workdir))

  @classmethod
  def for_compile(cls, config, tokenizer, **sizes):
    del sizes
    return cls(config, tokenizer)

  @classmethod
  def inference_model(cls, model_cfg, rngs, **sizes):
    del sizes
    return MatchModel(model_cfg, rngs=rngs)

  def build_model(self, rngs):
    return MatchModel(self.model_cfg, rngs=rngs)

  def batch_spec(self, batch_size):
    m = self.model_cfg
    return specs.pretrain(batch_size, m.image_size, m.max_text_len)

  def loss(self, model, batch, rng):
    logits, labels, s = _logits_and_labels(model, batch, rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = (logits.argmax(-1) == labels).mean()
    moe = moe_metrics(s)
    return ce + moe["aux_loss"], dict(match_loss=ce, match_acc=acc, **moe)

  def optimizer(self):
    return optim.make_optimizer(self.config.optim, self.steps)

  def analytic_flops_per_sample(self, batch_size):
    return 2 * flops.finetune_flops_per_sample(
        self.model_cfg, "vqa", batch_size
    )

  def train_batches(self, shard):
    return iter(
        sources.make_train_data(
            self.config, self.tokenizer, self.model_cfg, shard
        )
    )

  def initial_state(self, state, ctx):
    del ctx
    return state

  def evaluator(self, ctx):
    replicated = jax.sharding.NamedSharding(
        ctx.mesh, jax.sharding.PartitionSpec()
    )

    def correct(params, batch):
      model = nnx.merge(ctx.program.graphdef, params)
      logits, labels, _ = _logits_and_labels(model, batch)
      ok = (logits.argmax(-1) == labels).astype(jnp.float32)
      w = jnp.concatenate([batch["example_valid"]] * 2).astype(jnp.float32)
      return jnp.stack([(ok * w).sum(), w.sum()])

    step = jax.jit(
        correct,
        in_shardings=(ctx.program.state_shardings.params, ctx.eval_sharding),
        out_shardings=replicated,
    )
    to_global = functools.partial(
        sharding.global_batch,
        sharding=ctx.eval_sharding,
        batch_size=self.config.train.eval_batch_size,
    )

    def evaluate(state):
      total = np.zeros(2)
      for batch in sources.eval_batches(
          self.config, self.tokenizer, self.model_cfg, ctx.eval_shard
      ):
        total += np.asarray(
            jax.device_get(step(state.params, to_global(batch)))
        )
      return {"match_acc": float(total[0] / max(total[1], 1.0))}

    return evaluate

  def run_info(self, program):
    del program
    return {}

  def log_extra(self, train_batches):
    del train_batches
    return None

  def resolved_config(self):
    return {}
