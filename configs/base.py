r"""EVE-Base pretraining (and the CPU-sized variants).

  python -m eve_jax.main --config=configs/base.py:tiny --workdir=/tmp/eve_tiny

`:tiny` trains a 4-layer, 128-wide EVE (0.9M parameters) with masked signal
modeling on the built-in EVE-Shapes data: about 7 minutes on 2 CPU cores,
ending with eval.json around mlm_acc_visual 0.9, mlm_acc_visual_blank 0.3,
mim_loss 0.4x its baseline.

`:small` is a 6-layer, 384-wide model at 224 px (benchmarks, smoke tests).

With no arg: EVE-Base as in the paper (12 layers, 768 wide, soft-router MoE
with 32 experts top-2 in layers 10-11; AdamW 5e-4, 10k warmup + cosine,
batch 2048, 480k steps at 224 px) on the COCO + VG + SBU + CC3M mixture,
which this version does not read yet: it stops with an error saying so.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, variant="base")
  if a.variant in ("tiny", "small"):
    return shapes_config(a.variant)
  c = common.pretrain_config(a.variant)
  if a.variant == "large":  # paper: 280k steps at peak lr 2e-4
    c.optim.lr = 2e-4
    c.train.steps = 280_000
  return c


def shapes_config(variant: str):
  """EVE-Shapes pretraining sized for a CPU (tiny) or a quick check (small)."""
  c = common.pretrain_config(variant)
  c.model.max_text_len = 16
  c.model.vocab_size = 64
  c.data.name = "shapes"
  c.data.vocab_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.grad_clip_norm = 1.0
  c.train.update(dict(steps=1500, batch_size=64, log_every=50,
                      checkpoint_every=500, eval_every=500,
                      eval_examples=512, eval_batch_size=128))
  if variant == "small":
    c.model.max_text_len = 40
    c.train.update(dict(steps=100, batch_size=8, eval_examples=64,
                        eval_batch_size=8))
  return c
