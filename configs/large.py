r"""EVE-Large pretraining (paper: 24 layers, 1024 wide, 16 heads, soft-router
MoE with 32 experts top-2 in layers 21-23; AdamW 2e-4, 10k warmup + cosine,
batch 2048, 280k steps on COCO + VG + SBU + CC3M + CC12M).

  python -m eve_jax.main --config=configs/large.py --workdir=DIR

Real corpora are not read by this version yet: with no arg it stops with a
one-line error saying so; `configs/large.py:tiny` runs the CPU-sized model.
"""

from eve_jax import config_lib


def get_config(arg=None):
  return config_lib.get_pretrain_config(arg, default_variant="large")
