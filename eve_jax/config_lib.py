"""What the files in configs/ share: the arg parser and the recipe blocks.

It lives in the package (not next to the config files) so that a config file
can be loaded from any working directory by path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from eve_jax import sharding
from eve_jax.model.variants import VARIANTS, ModelConfig


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """ "tiny" or "tiny,steps=100" or "variant=small" -> ConfigDict.

  A bare word sets `variant`; key=value pairs are cast to the type of the
  default. Unknown keys are an error naming the key.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    if not eq:
      key, value = "variant", part
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}")
    kind = type(defaults[key]) if defaults[key] is not None else str
    out[key] = (
        value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    )
  return out


def model_config(variant: str, **overrides) -> ml_collections.ConfigDict:
  """The variant's full model block, every field explicit (so that any of
  them can be overridden with --config.model.KEY=VALUE)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
  kw = dict(VARIANTS[variant], variant=variant)
  kw.update(overrides)
  return ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(**kw)))


def reliability_config() -> dict:
  """train.* keys every task has.

  max_bad_steps: stop (one-line error) after this many steps in a row with
    a non-finite loss or gradient; each is skipped, not applied. 0: never.
  allow_config_change: resume a workdir whose config.json differs from this
    config in what is trained (model, objectives, optimizer, data, seed);
    refused by default (`eve_jax.run_config`).
  step_timeout_s: the step watchdog (`eve_jax.watchdog`): when no step
    finishes for this long, write the Python stacks to the workdir, say so
    in one line and exit with status 75. < 0: automatic, max(10 x the
    median step, 600 s); 0: off.
  grad_accum_steps: K microbatches of batch_size / K per optimizer step,
    gradients summed inside the compiled step (`eve_jax.accum`): the
    memory of the smaller batch, the recipe of the whole one. A memory
    knob: it may change on resume.
  """
  return dict(
      max_bad_steps=10,
      allow_config_change=False,
      step_timeout_s=-1.0,
      grad_accum_steps=1,
  )


def pretrain_config(variant: str) -> ml_collections.ConfigDict:
  """Paper recipe (Implementation Details, Appendix) for `variant`."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  # Masked signal modeling; "mlm,itc,itm" etc. are the paper's Table 1
  # comparison (eve_jax/tasks/pretrain.py).
  c.objectives = "mlm,mim"
  c.model = model_config(variant, max_text_len=40)
  c.masking = ml_collections.ConfigDict(
      dict(
          image_mask_ratio=0.75,
          text_mask_ratio=0.5,
          mlm_random_replace=False,
          norm_pix_loss=False,
      )
  )
  c.optim = ml_collections.ConfigDict(
      dict(
          lr=5e-4,
          warmup_steps=10_000,
          b1=0.9,
          b2=0.98,
          eps=1e-8,
          weight_decay=0.05,
          grad_clip_norm=0.0,
          end_lr_frac=0.0,
      )
  )
  c.train = ml_collections.ConfigDict(
      dict(
          steps=480_000,
          batch_size=2048,
          log_every=50,
          checkpoint_every=5_000,
          keep_checkpoints=3,
          eval_every=10_000,
          eval_examples=4096,
          eval_batch_size=256,
          # Each evaluation also draws DIR/viz/ (reconstructions, routing).
          viz=True,
          **reliability_config(),
      )
  )
  # Prepared corpora (python -m eve_jax.data.prepare) under data.dir, one
  # per subdirectory; "name:weight" to weight them, default by pair counts
  # (their union, as the paper). The tokenizer defaults to
  # data.dir/tokenizer.model (`prepare tokenizer`).
  c.data = ml_collections.ConfigDict(
      dict(
          name="corpora",
          dir="",
          mixture="coco,vg,sbu,cc3m",
          tokenizer="",
          num_threads=8,
          vocab_size=30522,
          num_tokenizer_captions=4000,
      )
  )
  # --config.mesh.data=2 --config.mesh.expert=4 ...; see eve_jax/sharding.py.
  c.mesh = sharding.mesh_config()
  c.axis_rules = sharding.rules_config()
  return c


def shapes_config(variant: str) -> ml_collections.ConfigDict:
  """EVE-Shapes pretraining sized for a CPU (tiny) or a quick check (small)."""
  c = pretrain_config(variant)
  c.data.name = "shapes"
  # --config.data.dir=DIR trains on prepared corpora instead: every corpus
  # under DIR unless data.mixture names some.
  c.data.mixture = ""
  c.data.vocab_size = 64
  c.model.vocab_size = 64
  c.model.max_text_len = 17  # the longest EVE-Shapes caption (16 words) + CLS
  # Stochastic depth regularizes; on an endless procedural stream it only
  # slows a 4-layer model down.
  c.model.drop_path = 0.0
  # 1e-3 learns shapes; 2e-3 learns colors faster but never shapes (measured).
  c.optim.update(dict(lr=1e-3, warmup_steps=100, grad_clip_norm=1.0))
  c.train.update(
      dict(
          steps=2000,
          batch_size=32,
          log_every=50,
          checkpoint_every=500,
          eval_every=500,
          eval_examples=512,
          eval_batch_size=128,
      )
  )
  if variant == "small":
    c.train.update(
        dict(steps=100, batch_size=8, eval_examples=64, eval_batch_size=8)
    )
  return c


def get_pretrain_config(
    arg: str | None, default_variant: str
) -> ml_collections.ConfigDict:
  """configs/base.py and configs/large.py: the paper's recipe for base and
  large, EVE-Shapes for tiny and small."""
  a = parse_arg(arg, variant=default_variant)
  if a.variant in ("tiny", "small"):
    return shapes_config(a.variant)
  c = pretrain_config(a.variant)
  if a.variant == "large":  # paper: 280k steps at peak lr 2e-4
    c.optim.lr = 2e-4
    c.data.mixture = "coco,vg,sbu,cc3m,cc12m"  # 21M pairs
    c.train.steps = 280_000
  return c


def finetune_config(
    task: str,
    variant: str,
    *,
    lr: float,
    batch_size: int,
    image_size: int,
    max_text_len: int = 40,
) -> ml_collections.ConfigDict:
  """What every fine-tuning recipe shares; configs/{vqa,nlvr2,retrieval}.py
  add their task's part (and hold the numbers).

  The paper's appendix for base / large: AdamW (b2 0.999, weight decay
  0.01, the heads at 10x lr), 10% warmup, cosine, 10 epochs, at `lr`,
  `batch_size` and `image_size`. `tiny`: the configs/base.py:tiny model on
  the EVE-Shapes version of the task (written into the workdir on first use,
  eve_jax/data/shapes_tasks.py, unless data.dir is given) at its own image
  size, lr 5e-4 with clipping, 3 epochs of 32.
  """
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  # A pretraining workdir or converted checkpoint (eve_jax/pretrained.py);
  # '' trains from scratch.
  c.init_from = ""
  c.model = model_config(
      variant,
      max_text_len=max_text_len,
      image_size=VARIANTS[variant]["image_size"] if tiny else image_size,
  )
  c.optim = ml_collections.ConfigDict(
      dict(
          lr=lr,
          head_lr_mult=10.0,
          warmup_frac=0.1,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.01,
          grad_clip_norm=0.0,
          end_lr_frac=0.0,
      )
  )
  c.train = ml_collections.ConfigDict(
      dict(
          epochs=10,
          steps=0,
          batch_size=batch_size,
          eval_batch_size=256,
          log_every=50,
          eval_every=0,
          checkpoint_every=1000,
          keep_checkpoints=2,
          **reliability_config(),
      )
  )
  c.data = ml_collections.ConfigDict(
      dict(dir="", image_dir="", tokenizer="", num_threads=8, shapes=False)
  )
  c.mesh = sharding.mesh_config()
  c.axis_rules = sharding.rules_config()
  if tiny:
    c.data.shapes = True
    c.data.num_threads = 2
    c.model.drop_path = 0.0
    c.optim.update(dict(lr=5e-4, grad_clip_norm=1.0))
    c.train.update(
        dict(
            epochs=3,
            batch_size=32,
            eval_batch_size=100,
            log_every=20,
            checkpoint_every=500,
        )
    )
  return c


CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def from_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """configs/NAME.py's `get_config(arg)`, as `--config=configs/NAME.py:ARG`
  gives it (for tests and tools in a checkout)."""
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"eve_jax_config_{name}", path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f"no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
