r"""EVE-Base pretraining (and the CPU-sized variants).

  python -m eve_jax.main --config=configs/base.py:tiny --workdir=/tmp/eve_tiny

`:tiny` trains a 4-layer, 128-wide EVE (2.0M backbone parameters) with masked
signal modeling on the built-in EVE-Shapes data: 2,000 steps of batch 32 in
5.4 minutes on 2 CPU cores, ending (seed 0) with eval.json mlm_acc_visual
0.81, mlm_acc_visual_blank 0.16, mim_loss 0.038 vs mim_loss_baseline 0.069.

`:small` is a 6-layer, 384-wide model at 224 px (benchmarks, smoke tests).

With no arg: EVE-Base as in the paper (12 layers, 768 wide, 12 heads,
soft-router MoE with 32 experts top-2 in layers 10-11; AdamW 5e-4, b2 0.98,
wd 0.05, 10k warmup + cosine, batch 2048, 480k steps at 224 px) on COCO +
VG + SBU + CC3M prepared under --config.data.dir (README, "Real corpora"):

  python -m eve_jax.main --config=configs/base.py --config.data.dir=/data/eve \
      --workdir=DIR
"""

from eve_jax import config_lib


def get_config(arg=None):
  return config_lib.get_pretrain_config(arg, default_variant="base")
