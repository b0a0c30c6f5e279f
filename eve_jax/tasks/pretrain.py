"""Masked signal modeling: masking, the MLM and MIM losses, evaluation.

The forward passes are the model's (eve_jax/model/passes.py); this module
masks their inputs and scores their outputs.

Two forward passes per batch (paper, eqs. 8-10):
  MLM: full image + text with `text_mask_ratio` (50%) of the tokens masked;
       cross-entropy on the masked positions only.
  MIM: the encoder sees the `1 - image_mask_ratio` (25%) visible patches
       plus the full text; the decoder reconstructs the masked patches'
       pixels; MSE on masked patches only.
  L = L_mlm + L_mim + sum of the MoE aux losses (already times alpha).

"joint" (the paper's Table 5, †) replaces the two passes by one: visible
patches + masked text, both heads on its states (set both mask ratios to
0.5 for the paper's row).

The objectives the paper compares against in Table 1 are here too, as real
losses (`PretrainTask.objectives`, e.g. ("mlm", "itc", "itm")):
  ITC: an image-only and a text-only pass, CLS projections, symmetric
       cross-entropy over the batch's similarity matrix.
  ITM: three fused passes, the pair and two hard negatives (an image for
       each text and a text for each image, drawn from the ITC
       similarities), match / no-match cross-entropy on the text CLS.

Legend: B batch, N patches, Nv visible patches, L text length, V vocabulary,
Q = P*P*3 pixel values per patch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eve_jax.model import batch_random
from eve_jax.model.embeddings import patchify
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.passes import (
    itc_pass,
    itm_pass,
    joint_pass,
    mim_pass,
    mlm_pass,
    moe_metrics,
)
from eve_jax.tasks.losses import contrastive_loss, cross_entropy, masked_mean


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  image_mask_ratio: float = 0.75
  text_mask_ratio: float = 0.5
  # BERT's 80% [MASK] / 10% random / 10% unchanged; False = always [MASK].
  mlm_random_replace: bool = False
  norm_pix_loss: bool = False


def num_masked(n, ratio: float):
  """How many of n positions a ratio masks: round-half-up(ratio * n).

  Python ints stay Python ints (static shapes); arrays give int32 arrays.
  """
  if isinstance(n, int):
    return int(ratio * n + 0.5)
  return jnp.floor(ratio * n + 0.5).astype(jnp.int32)


def random_text_mask(
    rng: jax.Array, maskable: jax.Array, ratio: float
) -> jax.Array:
  """Per-sample exact-count random mask over the maskable positions.

  Args:
    rng: PRNG key.
    maskable: [B, L] bool; True where a token may be masked (real tokens,
      not CLS, not padding).
    ratio: fraction of each sample's maskable tokens to mask.

  Returns:
    [B, L] bool, exactly round(ratio * maskable.sum(1)) True per row, all
    inside `maskable`.
  """
  noise = batch_random.uniform(rng, maskable.shape)
  noise = jnp.where(maskable, noise, 2.0)  # never pick unmaskable slots
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  k = num_masked(maskable.sum(axis=1), ratio)
  return (rank < k[:, None]) & maskable


def apply_text_mask(
    rng: jax.Array,
    text: jax.Array,
    mask: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    num_special: int,
    random_replace: bool,
) -> jax.Array:
  """Replaces masked tokens: [MASK], or BERT's 80/10/10 when random_replace."""
  if not random_replace:
    return jnp.where(mask, mask_id, text)
  r_kind, r_tok = jax.random.split(rng)
  u = batch_random.uniform(r_kind, text.shape)
  random_tok = batch_random.randint(r_tok, text.shape, num_special, vocab_size)
  replaced = jnp.where(u < 0.8, mask_id, jnp.where(u < 0.9, random_tok, text))
  return jnp.where(mask, replaced, text)


def random_patch_keep(
    rng: jax.Array, batch: int, num_patches: int, ratio: float
) -> tuple[jax.Array, jax.Array]:
  """Per-sample random patch masking (MAE): which patches stay visible.

  Returns:
    keep_idx: [B, Nv] int32 visible patch indices (Nv = N - round(ratio N)),
      sorted ascending.
    mask: [B, N] bool, True at masked patches.
  """
  n_masked = num_masked(num_patches, ratio)
  n_keep = num_patches - n_masked
  noise = batch_random.uniform(rng, (batch, num_patches))
  keep_idx = jnp.sort(jnp.argsort(noise, axis=1)[:, :n_keep], axis=1)
  mask = jnp.ones((batch, num_patches), bool)
  mask = jax.vmap(lambda m, i: m.at[i].set(False))(mask, keep_idx)
  return keep_idx.astype(jnp.int32), mask


def patch_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
  """[B, H, W, 3] -> [B, N, Q] float32 pixel targets (optionally per-patch
  normalized, MAE's norm_pix_loss)."""
  t = patchify(images.astype(jnp.float32), patch)
  t = t.reshape(t.shape[0], t.shape[1], -1)
  if norm_pix:
    mean = t.mean(-1, keepdims=True)
    var = t.var(-1, keepdims=True)
    t = (t - mean) / jnp.sqrt(var + 1e-6)
  return t


def mlm_loss_and_acc(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy over masked positions. logits [B, L, V]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  return masked_mean(nll, mask), masked_mean(correct, mask)


def mim_patch_errors(pred: jax.Array, target: jax.Array) -> jax.Array:
  """[B, N, Q] x2 -> [B, N] mean squared error per patch."""
  return jnp.square(pred - target).mean(-1)


@dataclasses.dataclass(frozen=True)
class PretrainTask:
  """The masking setup plus the token ids it needs from the tokenizer."""

  masking: MaskingConfig
  mask_id: int
  cls_id: int
  vocab_size: int
  num_special: int  # ids below this are specials: never a random token
  objectives: tuple[str, ...] = ("mlm", "mim")

  def __post_init__(self):
    unknown = set(self.objectives) - {"mlm", "mim", "joint", "itc", "itm"}
    if unknown or not self.objectives:
      raise ValueError(
          f"objectives {list(self.objectives)}: expected a "
          "non-empty subset of mlm, mim, joint, itc, itm"
      )
    if "joint" in self.objectives and {"mlm", "mim"} & set(self.objectives):
      raise ValueError(
          "objective joint is MLM and MIM in one pass with both "
          "modalities masked: it replaces mlm and mim, not adds to them"
      )
    if "itm" in self.objectives and "itc" not in self.objectives:
      raise ValueError(
          "objective itm draws its hard negatives from itc's "
          "similarities: add itc"
      )

  def maskable(self, batch: dict[str, jax.Array]) -> jax.Array:
    """[B, L] bool: the tokens MLM may mask (real, not CLS)."""
    return batch["text_valid"] & (batch["text"] != self.cls_id)

  def loss_weights(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{metric: [B] weight of each row} of the metrics that are not a
    mean over rows: MLM's loss and accuracy are means over the masked
    tokens, as many per sample as the masks draw (known from the text
    alone). What gradient accumulation weighs microbatches by
    (eve_jax/accum.py)."""
    if not {"mlm", "joint"} & set(self.objectives):
      return {}
    ratio = self.masking.text_mask_ratio
    count = num_masked(self.maskable(batch).sum(axis=1), ratio)
    count = count.astype(jnp.float32)
    return {"mlm_loss": count, "mlm_acc": count}

  def masks(
      self, rng: jax.Array, batch: dict[str, jax.Array], num_patches: int
  ):
    """Draws the MLM text mask and the MIM visible patches for one batch."""
    r_text, r_patch, r_replace = jax.random.split(rng, 3)
    text = batch["text"]
    maskable = self.maskable(batch)
    text_mask = random_text_mask(r_text, maskable, self.masking.text_mask_ratio)
    text_in = apply_text_mask(
        r_replace,
        text,
        text_mask,
        mask_id=self.mask_id,
        vocab_size=self.vocab_size,
        num_special=self.num_special,
        random_replace=self.masking.mlm_random_replace,
    )
    keep_idx, patch_mask = random_patch_keep(
        r_patch, text.shape[0], num_patches, self.masking.image_mask_ratio
    )
    return text_in, text_mask, keep_idx, patch_mask

  def loss(
      self,
      model: EVEPretrainModel,
      batch: dict[str, jax.Array],
      rng: jax.Array,
      *,
      train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts for one batch.

    Args:
      model: the pretraining model (merged inside the jitted step).
      batch: `image` [B, H, W, 3], `text` [B, L] int32, `text_valid` [B, L].
      rng: PRNG key for masks and (when train) drop path.

    Returns:
      (scalar loss, metrics dict of scalars).
    """
    cfg = model.cfg
    r_mask, r_drop = jax.random.split(rng)
    # The same keys as before ITC/ITM existed, so MLM+MIM runs reproduce.
    r_mlm, r_mim = jax.random.split(r_drop)
    text_in, text_mask, keep_idx, patch_mask = self.masks(
        r_mask, batch, cfg.num_patches
    )
    images, text, valid = batch["image"], batch["text"], batch["text_valid"]
    drop = (lambda r: r) if train else (lambda r: None)
    metrics, stats = {}, []

    def score_words(logits):  # [B, L, V] -> mlm_loss, mlm_acc
      metrics["mlm_loss"], metrics["mlm_acc"] = mlm_loss_and_acc(
          logits, text, text_mask
      )

    def score_pixels(pred):  # [B, N, Q] -> mim_loss on the masked patches
      target = patch_targets(images, cfg.patch_size, self.masking.norm_pix_loss)
      metrics["mim_loss"] = masked_mean(
          mim_patch_errors(pred, target), patch_mask
      )

    if "mlm" in self.objectives:
      logits, s = mlm_pass(model, images, text_in, valid, drop(r_mlm))
      score_words(logits)
      stats.append(s)
    if "mim" in self.objectives:
      pred, s = mim_pass(model, images, text, valid, keep_idx, drop(r_mim))
      score_pixels(pred)
      stats.append(s)
    if "joint" in self.objectives:
      logits, pred, s = joint_pass(
          model, images, text_in, valid, keep_idx, drop(r_mlm)
      )
      score_words(logits)
      score_pixels(pred)
      stats.append(s)
    if "itc" in self.objectives:
      r_itc, r_itm, r_neg = jax.random.split(jax.random.fold_in(r_drop, 1), 3)
      sims, s = itc_pass(model, images, text, valid, drop(r_itc))
      metrics["itc_loss"] = contrastive_loss(sims)
      stats.append(s)
      if "itm" in self.objectives:
        itm_logits, labels, s = itm_pass(
            model, images, text, valid, sims, r_neg, drop(r_itm)
        )
        metrics["itm_loss"] = cross_entropy(itm_logits, labels)
        metrics["itm_acc"] = jnp.mean(
            (itm_logits.argmax(-1) == labels).astype(jnp.float32)
        )
        stats.append(s)
    moe = moe_metrics(*stats)
    loss = (
        sum(v for k, v in metrics.items() if k.endswith("_loss"))
        + moe["aux_loss"]
    )
    metrics.update(loss=loss, **moe)
    return loss, metrics


def eval_sums(
    task: PretrainTask,
    model: EVEPretrainModel,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    visual_ids: jax.Array,
    blank_image: jax.Array,
) -> dict[str, jax.Array]:
  """Counts and sums for the pretraining evaluation of one batch.

  Sums (not means) so that batches of any size add up exactly. The masks
  come from `rng`, the same for the real and the blank-image pass, so
  `mlm_acc_visual_blank` differs from `mlm_acc_visual` only by the image.

  Args:
    visual_ids: [W] int32 ids of the words only the image can tell (colors,
      shapes).
    blank_image: [H, W, 3] normalized background-only image.
    batch: as in `PretrainTask.loss`, plus optional `example_valid` [B] bool
      (False for padding examples of a last partial batch).
  """
  cfg = model.cfg
  images, text, valid = batch["image"], batch["text"], batch["text_valid"]
  ex_valid = batch.get("example_valid", jnp.ones(text.shape[:1], bool))
  r_mask, _ = jax.random.split(rng)  # the masks `PretrainTask.loss` draws
  text_in, text_mask, keep_idx, patch_mask = task.masks(
      r_mask, batch, cfg.num_patches
  )
  text_mask = text_mask & ex_valid[:, None]
  patch_mask = patch_mask & ex_valid[:, None]
  is_visual = (text[..., None] == visual_ids).any(-1) & text_mask

  def mlm_correct(imgs):
    logits, stats = mlm_pass(model, imgs, text_in, valid, None)
    return (logits.argmax(-1) == text).astype(jnp.float32), stats

  correct, stats = mlm_correct(images)
  blank = jnp.broadcast_to(blank_image.astype(images.dtype), images.shape)
  correct_blank, _ = mlm_correct(blank)

  pred, s_mim = mim_pass(model, images, text, valid, keep_idx, None)
  target = patch_targets(images, cfg.patch_size, task.masking.norm_pix_loss)
  # Baseline: every masked patch predicted as the mean of the visible ones.
  visible = (~patch_mask)[..., None].astype(jnp.float32)
  mean_visible = (target * visible).sum(1, keepdims=True) / jnp.maximum(
      visible.sum(1, keepdims=True), 1.0
  )
  f32 = lambda m: m.astype(jnp.float32)
  return dict(
      mlm_correct=(correct * f32(text_mask)).sum(),
      mlm_count=f32(text_mask).sum(),
      visual_correct=(correct * f32(is_visual)).sum(),
      visual_blank_correct=(correct_blank * f32(is_visual)).sum(),
      blank_correct=(correct_blank * f32(text_mask)).sum(),
      visual_count=f32(is_visual).sum(),
      mim_err=(mim_patch_errors(pred, target) * f32(patch_mask)).sum(),
      mim_base_err=(
          mim_patch_errors(jnp.broadcast_to(mean_visible, target.shape), target)
          * f32(patch_mask)
      ).sum(),
      patch_count=f32(patch_mask).sum(),
      dropped=stats["dropped"] + s_mim["dropped"],
      routed=stats["routed"] + s_mim["routed"],
      # Figure 6's numbers: the MLM pass sees every image token.
      expert_counts=stats["expert_counts"],
      router_entropy=stats["router_entropy"],
  )


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Turns the summed `eval_sums` of a whole evaluation set into eval.json."""
  div = lambda a, b: float(sums[a]) / max(float(sums[b]), 1.0)
  out = dict(
      mlm_acc=div("mlm_correct", "mlm_count"),
      # Every masked word again with a blank image: what the text alone gets.
      mlm_acc_blank=div("blank_correct", "mlm_count"),
      mlm_acc_visual=div("visual_correct", "visual_count"),
      mlm_acc_visual_blank=div("visual_blank_correct", "visual_count"),
      mim_loss=div("mim_err", "patch_count"),
      mim_loss_baseline=div("mim_base_err", "patch_count"),
      dropped_token_frac=div("dropped", "routed"),
      num_masked_tokens=int(sums["mlm_count"]),
      num_masked_visual_words=int(sums["visual_count"]),
  )
  if not out["num_masked_visual_words"]:  # real corpora: no such word list
    for k in (
        "mlm_acc_visual",
        "mlm_acc_visual_blank",
        "num_masked_visual_words",
    ):
      del out[k]
  return out
