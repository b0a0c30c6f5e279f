r"""EVE-Large pretraining (paper: 24 layers, 1024 wide, 16 heads, soft-router
MoE with 32 experts top-2 in layers 21-23; AdamW 2e-4, 10k warmup + cosine,
batch 2048, 280k steps on COCO + VG + SBU + CC3M + CC12M).

  python -m eve_jax.main --config=configs/large.py --config.data.dir=/data/eve \
      --workdir=DIR

The five corpora are prepared under data.dir as in README ("Real
corpora"); without them it stops with a one-line error naming the missing
directory and the `prepare` command. `configs/large.py:tiny` runs the
CPU-sized model on EVE-Shapes.
"""

from eve_jax import config_lib


def get_config(arg=None):
  return config_lib.get_pretrain_config(arg, default_variant="large")
