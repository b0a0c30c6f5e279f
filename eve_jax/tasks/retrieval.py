"""Image-text retrieval fine-tuning (COCO / Flickr30K Karpathy splits).

Data (`config.data`): a Karpathy split file (`karpathy`, e.g.
dataset_coco.json or dataset_flickr30k.json, under `dir`) and the image
root (`image_root`, default dir/images). Training walks every (image,
caption) pair of the train split (with restval).

Loss: ITC over the batch with targets aware of several captions per image
(every caption of the same image is a positive, the target spread evenly
over them, both directions) + ITM on the pair, a hard-negative image and a
hard-negative text drawn from the ITC similarities among non-positives.

Evaluation (test split): ITC similarities of every image against every
caption (unimodal passes), then the top `retrieval.k_test` candidates of
each image and of each caption rescored by ITM on a fused pass; recall@1/5/10
both ways and their mean from the reranked scores (tr_r*, ir_r*, r_mean),
and from ITC alone (itc_tr_r1, ...).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from eve_jax import accum
from eve_jax.data import downstream, finetune_data, specs
from eve_jax.finetune import FineTuning
from eve_jax.model.task_models import RetrievalModel
from eve_jax.tasks import metrics as M
from eve_jax.model.passes import itc_pass, itm_pass, moe_metrics
from eve_jax.tasks.losses import cross_entropy


def multi_positive_contrastive(
    sims: jax.Array, positive: jax.Array
) -> jax.Array:
  """Cross-entropy of [B, B] similarities against targets spread evenly
  over each row's (and column's) positives; mean of both directions."""
  pos = positive.astype(jnp.float32)

  def one_way(s, p):
    logp = jax.nn.log_softmax(s.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(p / p.sum(-1, keepdims=True) * logp, -1))

  return (one_way(sims, pos) + one_way(sims.T, pos.T)) / 2


class RetrievalTask(FineTuning):
  name = "retrieval"
  metric = "r_mean"

  @classmethod
  def check(cls, config, workdir: str) -> None:
    super().check(config, workdir)
    accum.refuse_batch_level(
        config.train.get("grad_accum_steps", 1), "retrieval's ITC"
    )

  def __init__(self, config, tokenizer, model_cfg, data_dir=None):
    self.tokenizer = tokenizer
    self.model_cfg = model_cfg
    d = config.data
    self.k_test = config.retrieval.k_test
    data_dir = data_dir or d.dir
    path = finetune_data.resolve(data_dir, d.karpathy)
    root = d.image_root or os.path.join(data_dir, "images")
    train = downstream.load_karpathy(path, root, "train")
    self.test_images = downstream.load_karpathy(
        path, root, d.get("eval_split", "test")
    )
    downstream.check_images(train + self.test_images)
    self.train_examples = [
        (img.image_path, cap, i)
        for i, img in enumerate(train)
        for cap in img.captions
    ]
    self.texts = [
        (cap, i)
        for i, img in enumerate(self.test_images)
        for cap in img.captions
    ]
    self.num_train = len(self.train_examples)

  @classmethod
  def inference_model(cls, model_cfg, rngs, **_):
    return RetrievalModel(model_cfg, rngs=rngs)

  def build_model(self, rngs):
    return self.inference_model(self.model_cfg, rngs)

  def batch_spec(self, batch_size: int) -> specs.Spec:
    """One global batch of `encode_train` rows."""
    m = self.model_cfg
    return specs.retrieval(batch_size, m.image_size, m.max_text_len)

  def _sizes(self, config, **sizes) -> None:
    del sizes
    self.k_test = config.retrieval.k_test

  def _text(self, caption: str):
    ids, valid = self.tokenizer.encode_batch(
        [caption], self.model_cfg.max_text_len
    )
    return ids[0], valid[0]

  def _image(self, path: str):
    return finetune_data.read_image(path, self.model_cfg.image_size)

  def encode_train(self, ex) -> dict[str, np.ndarray]:
    path, caption, image_index = ex
    text, valid = self._text(caption)
    return dict(
        image=self._image(path),
        text=text,
        text_valid=valid,
        image_index=np.int32(image_index),
    )

  def loss(self, model, batch, rng):
    r_itc, r_itm, r_neg = jax.random.split(rng, 3)
    images, text, valid = batch["image"], batch["text"], batch["text_valid"]
    idx = batch["image_index"]
    positive = idx[:, None] == idx[None, :]
    sims, s_itc = itc_pass(model, images, text, valid, r_itc)
    itc = multi_positive_contrastive(sims, positive)
    logits, labels, s_itm = itm_pass(
        model, images, text, valid, sims, r_neg, r_itm, positive
    )
    itm = cross_entropy(logits, labels)
    moe = moe_metrics(s_itc, s_itm)
    itm_acc = (logits.argmax(-1) == labels).astype(jnp.float32).mean()
    return itc + itm + moe["aux_loss"], dict(
        itc_loss=itc, itm_loss=itm, itm_acc=itm_acc, **moe
    )

  # --- evaluation ------------------------------------------------------------

  @staticmethod
  def _unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)

  # The functions run_eval jits: methods, so that its cache finds them again.
  def image_embedding(self, model, batch):
    return self._unit(
        model.matching.image_proj(model.image_features(batch["image"]))
    )

  def text_embedding(self, model, batch):
    return self._unit(
        model.matching.text_proj(
            model.text_features(batch["text"], batch["text_valid"])
        )
    )

  @staticmethod
  def match_score(model, batch):
    return model.match_scores(
        batch["image"], batch["text"], batch["text_valid"]
    )

  def evaluate(self, run_eval, workdir: str, is_main: bool) -> dict:
    del workdir, is_main
    img_emb = run_eval(
        self.test_images,
        lambda im: dict(image=self._image(im.image_path)),
        self.image_embedding,
    )
    txt_emb = run_eval(
        self.texts,
        lambda t: dict(zip(("text", "text_valid"), self._text(t[0]))),
        self.text_embedding,
    )
    sims = img_emb @ txt_emb.T  # [I, T]
    text_to_image = [i for _, i in self.texts]
    out = {
        f"itc_{k}": v
        for k, v in M.retrieval_recall(sims, text_to_image).items()
    }

    # ITM on the union of both directions' top-k candidate pairs.
    k_t2i = min(self.k_test, sims.shape[0])
    k_i2t = min(self.k_test, sims.shape[1])
    top_i2t = np.argsort(-sims, axis=1, kind="stable")[:, :k_i2t]
    top_t2i = np.argsort(-sims.T, axis=1, kind="stable")[:, :k_t2i]
    pairs = sorted(
        {(i, int(t)) for i, row in enumerate(top_i2t) for t in row}
        | {(int(i), t) for t, row in enumerate(top_t2i) for i in row}
    )

    def encode_pair(pair):
      i, t = pair
      text, valid = self._text(self.texts[t][0])
      return dict(
          image=self._image(self.test_images[i].image_path),
          text=text,
          text_valid=valid,
      )

    scores = run_eval(pairs, encode_pair, self.match_score)
    itm = dict(zip(pairs, scores.tolist()))
    i2t = M.rerank_topk(
        sims,
        k_i2t,
        lambda i, cands: np.array([itm[(i, int(t))] for t in cands]),
    )
    t2i = M.rerank_topk(
        sims.T,
        k_t2i,
        lambda t, cands: np.array([itm[(int(i), t)] for i in cands]),
    )
    tr = M.retrieval_recall(i2t, text_to_image)
    ir = M.retrieval_recall(t2i.T, text_to_image)
    for k in (1, 5, 10):
      out[f"tr_r{k}"] = tr[f"tr_r{k}"]
      out[f"ir_r{k}"] = ir[f"ir_r{k}"]
    out["r_mean"] = float(
        np.mean([out[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 5, 10)])
    )
    return out
