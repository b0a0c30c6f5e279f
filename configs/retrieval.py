r"""Image-text retrieval fine-tuning (COCO / Flickr30K Karpathy splits):
`get_config(arg)`, arg `base` (default), `large` or `tiny`.

  python -m eve_jax.main --config=configs/retrieval.py:tiny --workdir=DIR \
      --config.init_from=PRETRAIN_DIR

tiny: the configs/base.py:tiny model on EVE-Shapes retrieval (3,000 images
x 5 captions; 100 test images), 469 steps of 32: r_mean 0.971 from README's
tiny pretraining run against 0.315 from scratch (--config.init_from=),
5-8 minutes each on 2 CPU cores.

base / large: the paper's appendix (lr 3.5e-5 / 5e-5, batch 256, 384 px, 10
epochs; the rest in eve_jax/config_lib.py:finetune_config) on the Karpathy
split file under --config.data.dir (README, "Fine-tuning"). ITC ranks, ITM
reranks ITC's top `retrieval.k_test`.
"""

import ml_collections

from eve_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_arg(arg, variant="base").variant
  tiny = variant == "tiny"
  c = config_lib.finetune_config(
      "retrieval",
      variant,
      lr=5e-5 if variant == "large" else 3.5e-5,
      batch_size=256,
      image_size=384,
  )
  c.data.update(
      dict(
          karpathy="dataset_shapes.json" if tiny else "dataset_coco.json",
          image_root="",
      )
  )
  # ITC picks the top k candidates, ITM reranks them (paper: 128).
  c.retrieval = ml_collections.ConfigDict(dict(k_test=16 if tiny else 128))
  if tiny:
    c.train.epochs = 1  # 15,000 pairs, 5 passes each
  return c
