"""NLVR2 fine-tuning: is the sentence true of the pair of images?

Data (`config.data`): the official JSON-lines files under `dir` (`train`,
`eval` = dev.json, `test` = test1.json, i.e. test-P) and their image
folders `image_dir`/{train,dev,test1} (default dir/images), as the NLVR2
release lays them out. Each example runs as two fused passes, (image_0,
sentence) and (image_1, sentence), joined by the bi-attention head
(`model.task_models.NLVR2Model`); cross-entropy over true / false.
eval.json: nlvr2_acc (dev) and nlvr2_acc_test (test-P).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from eve_jax.data import downstream, finetune_data, specs
from eve_jax.finetune import FineTuning
from eve_jax.model.task_models import NLVR2Model
from eve_jax.tasks import metrics as M
from eve_jax.model.passes import moe_metrics, sum_moe_stats
from eve_jax.tasks.losses import cross_entropy


class NLVR2Task(FineTuning):
  name = "nlvr2"
  metric = "nlvr2_acc"

  def __init__(self, config, tokenizer, model_cfg, data_dir=None):
    self.tokenizer = tokenizer
    self.model_cfg = model_cfg
    d = config.data
    self.dir = data_dir or d.dir
    self.image_dir = d.image_dir or os.path.join(self.dir, "images")
    self.train_examples = self._load(d.train)
    self.eval_examples = self._load(d.eval) if d.eval else []
    self.test_examples = self._load(d.test) if d.test else []
    self.num_train = len(self.train_examples)

  def _load(self, name: str):
    path = finetune_data.resolve(self.dir, name)
    split = os.path.splitext(os.path.basename(name))[0]
    examples = downstream.load_nlvr2(path, os.path.join(self.image_dir, split))
    downstream.check_images(examples)
    return examples

  @classmethod
  def inference_model(cls, model_cfg, rngs, **_):
    return NLVR2Model(model_cfg, rngs=rngs)

  def build_model(self, rngs):
    return self.inference_model(self.model_cfg, rngs)

  def batch_spec(self, batch_size: int) -> specs.Spec:
    """One global batch of `encode_train` rows."""
    m = self.model_cfg
    return specs.nlvr2(batch_size, m.image_size, m.max_text_len)

  def encode_train(self, ex) -> dict[str, np.ndarray]:
    size = self.model_cfg.image_size
    ids, valid = self.tokenizer.encode_batch(
        [ex.sentence], self.model_cfg.max_text_len
    )
    return dict(
        image0=finetune_data.read_image(ex.image_paths[0], size),
        image1=finetune_data.read_image(ex.image_paths[1], size),
        text=ids[0],
        text_valid=valid[0],
        label=np.int32(ex.label),
    )

  encode_eval = encode_train

  def loss(self, model, batch, rng):
    logits, stats = model(
        batch["image0"],
        batch["image1"],
        batch["text"],
        batch["text_valid"],
        rng=rng,
    )
    ce = cross_entropy(logits, batch["label"])
    moe = moe_metrics(sum_moe_stats(stats))
    acc = (logits.argmax(-1) == batch["label"]).astype(jnp.float32).mean()
    return ce + moe["aux_loss"], dict(nlvr2_loss=ce, nlvr2_train_acc=acc, **moe)

  @staticmethod
  def predict(model, batch):
    logits, _ = model(
        batch["image0"], batch["image1"], batch["text"], batch["text_valid"]
    )
    return logits.argmax(-1).astype(jnp.int32)

  def evaluate(self, run_eval, workdir: str, is_main: bool) -> dict:
    del workdir, is_main
    out = {}
    for key, examples in (
        ("nlvr2_acc", self.eval_examples),
        ("nlvr2_acc_test", self.test_examples),
    ):
      if examples:
        pred = run_eval(examples, self.encode_eval, self.predict)
        out[key] = M.nlvr2_accuracy(pred, [int(ex.label) for ex in examples])
    return out
