r"""retrieval fine-tuning: `get_config(arg)` with arg `base` (default), `large` or `tiny`.

  python -m eve_jax.main --config=configs/retrieval.py:tiny --workdir=DIR \
      --config.init_from=PRETRAIN_DIR

base / large follow the paper's appendix (AdamW, weight decay 0.01, 10%
warmup, cosine, 10 epochs; eve_jax/config_lib.py has the numbers) and read
the official data under --config.data.dir; tiny fine-tunes the
configs/base.py:tiny model on the EVE-Shapes version of the task (written
into the workdir). --config.init_from='' starts from random weights.
"""

from eve_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_config("retrieval", arg)
