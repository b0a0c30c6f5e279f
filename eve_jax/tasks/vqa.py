"""VQAv2 fine-tuning: answer classification with soft scores and BCE.

Data (`config.data`): the official files under `dir`:
  v2_OpenEnded_mscoco_{split}_questions.json, v2_mscoco_{split}_annotations.json
for each split of `train_splits` (comma-separated; the paper trains on
train2014,val2014 and reports test-dev from the evaluation server),
`eval_split` (annotated: vqa_acc, and vqa_acc_{yes_no,number,other} per
answer type as the official evaluation reports them, by the rule
`vqa.metric` names, "vqa2021" or "vqa2016", which eval.json records as
vqa_metric) and `test_split`
(questions only: a prediction file in the server's format,
DIR/vqa_{test_split}_predictions.json), and optionally Visual Genome QA
(`vg_qa` = question_answers.json, images in `vg_image_dir`) added to the
training questions.
Images: `image_dir` (default dir/images), or its {split}/ subfolder when it
exists (COCO's train2014/, val2014/, test2015/ folders).

The answer vocabulary is every answer that is the majority answer of at
least `vqa.min_answer_count` training questions (9 gives the usual 3,129 on
VQAv2 train+val), normalized as the official evaluation does. Targets are
soft scores (0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ annotators); the loss
is binary cross-entropy summed over answers, averaged over questions.
The vocabulary, in classifier order, is written to DIR/answers.json at each
evaluation (`python -m eve_jax.predict vqa` reads it).
"""

from __future__ import annotations

import collections
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import optax

from eve_jax import storage
from eve_jax.data import downstream, downstream_vqa, finetune_data, specs
from eve_jax.data.errors import DataError
from eve_jax.finetune import FineTuning
from eve_jax.model.task_models import VQAModel
from eve_jax.tasks import vqa_metric as V
from eve_jax.model.passes import moe_metrics, sum_moe_stats

ANSWERS_FILE = "answers.json"


def write_answers(workdir: str, vocab) -> None:
  """DIR/answers.json: the answer of each classifier output, in order."""
  path = os.path.join(workdir, ANSWERS_FILE)
  if storage.is_gcs(path):  # one upload: atomic by itself
    storage.write_text(path, json.dumps(list(vocab)))
    return
  with open(path + ".tmp", "w") as f:
    json.dump(list(vocab), f)
  os.replace(path + ".tmp", path)


def accuracy_per_answer_type(
    predictions, examples, rule: str = V.DEFAULT_VQA_RULE
) -> dict[str, float]:
  """{"vqa_acc_yes_no": .., "vqa_acc_number": .., "vqa_acc_other": ..}:
  the official evaluation's per-answer-type accuracy (by `rule`), over the
  examples whose annotation names a type. A type's key is its name with
  each run of non-word characters made "_" ("yes/no" -> "yes_no"); where
  two types would get one key, theirs escape each character instead
  ("yes/no" -> "yes_x2f_no"), so no two types share a number."""
  by_type = collections.defaultdict(lambda: ([], []))
  for pred, ex in zip(predictions, examples, strict=True):
    if ex.answer_type is not None:
      preds, gts = by_type[ex.answer_type]
      preds.append(pred)
      gts.append(ex.answers)
  plain = {t: re.sub(r"\W+", "_", t) for t in by_type}
  clash = collections.Counter(plain.values())

  def key(t):
    if clash[plain[t]] == 1:
      return "vqa_acc_" + plain[t]
    return "vqa_acc_" + re.sub(
        r"[^0-9A-Za-z]", lambda m: f"_x{ord(m[0]):02x}_", t
    )

  out = {
      key(t): V.mean_vqa_accuracy(p, g, rule=rule)
      for t, (p, g) in sorted(by_type.items())
  }
  if len(out) != len(by_type):  # an escaped key equal to a plain one
    raise DataError(
        f"answer types {sorted(by_type)} do not get distinct "
        "eval.json keys; rename one in the annotations"
    )
  return out


def _majority(answers) -> str:
  counts = collections.Counter(V.normalize_answer(a) for a in answers)
  return max(counts.items(), key=lambda kv: (kv[1], -len(kv[0]), kv[0]))[0]


class VQATask(FineTuning):
  """See the module docstring. `metric` is what eval.json leads with."""

  name = "vqa"
  metric = "vqa_acc"

  def __init__(self, config, tokenizer, model_cfg, data_dir=None):
    self.tokenizer = tokenizer
    self.model_cfg = model_cfg
    d = config.data
    self.dir = data_dir or d.dir
    self.image_dir = d.image_dir or os.path.join(self.dir, "images")
    splits = [s.strip() for s in d.train_splits.split(",") if s.strip()]
    self.train_examples = [ex for s in splits for ex in self._load(s, True)]
    if d.get("vg_qa"):  # Visual Genome QA as extra training data (optional;
      # the paper does not use it)
      vg = downstream_vqa.load_vg_qa(d.vg_qa, d.vg_image_dir)
      downstream.check_images(vg)
      self.train_examples += vg
    self.eval_examples = self._load(d.eval_split, True) if d.eval_split else []
    self.test_split = d.test_split
    self.test_examples = self._load(d.test_split, False) if d.test_split else []
    self.vocab = V.build_answer_vocab(
        [[_majority(ex.answers)] for ex in self.train_examples],
        min_count=config.vqa.min_answer_count,
    )
    if not self.vocab:
      raise DataError(
          f"no answer is the majority answer of "
          f"{config.vqa.min_answer_count}+ training questions "
          f"in {self.dir}"
      )
    self.answer_index = V.answer_index(self.vocab)
    self.num_train = len(self.train_examples)
    self.metric_rule = config.vqa.get("metric", V.DEFAULT_VQA_RULE)
    if self.metric_rule not in V.VQA_RULES:
      raise ValueError(
          f"vqa.metric={self.metric_rule!r}: expected one of "
          f"{V.VQA_RULES} (the official script of 2021 or "
          "2016)"
      )

  def _load(self, split: str, annotated: bool):
    questions = os.path.join(
        self.dir, f"v2_OpenEnded_mscoco_{split}_questions.json"
    )
    annotations = (
        os.path.join(self.dir, f"v2_mscoco_{split}_annotations." "json")
        if annotated
        else None
    )
    sub = os.path.join(self.image_dir, split)
    images = sub if os.path.isdir(sub) else self.image_dir
    examples = downstream_vqa.load_vqa(questions, annotations, images)
    downstream.check_images(examples)
    return examples

  @classmethod
  def inference_model(cls, model_cfg, rngs, num_answers: int = 3129, **_):
    return VQAModel(model_cfg, num_answers, rngs=rngs)

  def build_model(self, rngs):
    return self.inference_model(
        self.model_cfg, rngs, num_answers=len(self.vocab)
    )

  def batch_spec(self, batch_size: int) -> specs.Spec:
    """One global batch of `encode_train` rows."""
    m = self.model_cfg
    return specs.vqa(batch_size, m.image_size, m.max_text_len, len(self.vocab))

  def _sizes(self, config, num_answers: int = 3129, **sizes) -> None:
    """`num_answers` (default 3,129, VQAv2's) sizes the classifier."""
    del config, sizes
    # Stand-in answers: only their number shapes the program.
    self.vocab = [f"<answer {i}>" for i in range(num_answers)]

  def _inputs(self, ex) -> dict[str, np.ndarray]:
    ids, valid = self.tokenizer.encode_batch(
        [ex.question], self.model_cfg.max_text_len
    )
    return dict(
        image=finetune_data.read_image(
            ex.image_path, self.model_cfg.image_size
        ),
        text=ids[0],
        text_valid=valid[0],
    )

  def encode_train(self, ex) -> dict[str, np.ndarray]:
    out = self._inputs(ex)
    out["target"] = V.soft_target_vector(
        ex.answers, self.answer_index, len(self.vocab)
    )
    return out

  encode_eval = _inputs

  def loss(self, model, batch, rng):
    logits, stats = model(
        batch["image"], batch["text"], batch["text_valid"], rng=rng
    )
    target = batch["target"]
    bce = optax.sigmoid_binary_cross_entropy(logits, target).sum(-1).mean()
    moe = moe_metrics(sum_moe_stats(stats))
    # The soft score of the top answer: the training-set VQA score.
    top = jnp.take_along_axis(target, logits.argmax(-1)[:, None], -1)
    return bce + moe["aux_loss"], dict(
        vqa_loss=bce, vqa_score=top.mean(), **moe
    )

  @staticmethod
  def predict(model, batch):
    logits, _ = model(batch["image"], batch["text"], batch["text_valid"])
    return logits.argmax(-1).astype(jnp.int32)

  def evaluate(self, run_eval, workdir: str, is_main: bool) -> dict:
    """vqa_acc on eval_split; the test split's predictions and the answer
    vocabulary written out."""
    out = {}
    if is_main:
      write_answers(workdir, self.vocab)
    if self.eval_examples:
      pred = run_eval(self.eval_examples, self.encode_eval, self.predict)
      answers = [self.vocab[int(i)] for i in pred]
      out["vqa_acc"] = V.mean_vqa_accuracy(
          answers,
          [ex.answers for ex in self.eval_examples],
          rule=self.metric_rule,
      )
      out.update(
          accuracy_per_answer_type(
              answers, self.eval_examples, self.metric_rule
          )
      )
      out["vqa_metric"] = self.metric_rule
    if self.test_examples:
      pred = run_eval(self.test_examples, self.encode_eval, self.predict)
      if is_main:
        downstream_vqa.write_vqa_predictions(
            os.path.join(workdir, f"vqa_{self.test_split}_predictions.json"),
            [
                (ex.question_id, self.vocab[int(i)])
                for ex, i in zip(self.test_examples, pred)
            ],
        )
    return out
