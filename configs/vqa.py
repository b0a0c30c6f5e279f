r"""VQAv2 fine-tuning: `get_config(arg)`, arg `base` (default), `large` or `tiny`.

  python -m eve_jax.main --config=configs/vqa.py:tiny --workdir=DIR \
      --config.init_from=PRETRAIN_DIR

tiny: the configs/base.py:tiny model on EVE-Shapes VQA (7,455 questions,
744 eval; written into the workdir), 699 steps of 32: vqa_acc 0.705 from
README's tiny pretraining run against 0.428 from scratch
(--config.init_from=), about 100 s each on 2 CPU cores.

base / large: the paper's appendix (lr 3e-5, batch 128, 480 px, 10 epochs;
the rest in eve_jax/config_lib.py:finetune_config) on the official files
under --config.data.dir (README, "Fine-tuning"). Accuracy is today's official
VQA rule (`vqa.metric=vqa2021`; `vqa2016` for the older script).
"""

import ml_collections

from eve_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, variant="base").variant
  tiny = variant == "tiny"
  # tiny: its tokenizer knows only caption words, so question words split
  # into letters: 24 tokens hold every EVE-Shapes question.
  c = config_lib.finetune_config(
      "vqa",
      variant,
      lr=3e-5,
      batch_size=128,
      image_size=480,
      max_text_len=24 if tiny else 40,
  )
  c.data.update(
      dict(
          train_splits="train2014",
          eval_split="val2014",
          test_split="test2015" if tiny else "",
          vg_qa="",
          vg_image_dir="",
      )
  )
  # min_answer_count: answers given this often in training form the answer
  # vocabulary. metric: the official script's answer processing,
  # "vqa2021" (today's) or "vqa2016" (tasks/metrics.py, VQA_RULES).
  c.vqa = ml_collections.ConfigDict(dict(min_answer_count=9, metric="vqa2021"))
  return c
