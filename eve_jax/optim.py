"""AdamW with linear warmup + cosine decay, as in the paper's recipe.

Weight decay applies to matmul weights only: biases, norms, layer scales,
embeddings (word, position, type, CLS, mask token, modality) are not
decayed (BEiT / EVE practice).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameter names (last path element) that are matmul weights.
DECAYED = frozenset(
    {
        "kernel",
        "q_kernel",
        "k_kernel",
        "v_kernel",
        "out_kernel",
        "patch_kernel",
        "wi",
        "wo",
    }
)


def _leaf_name(path) -> str:
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  names = [n for n in names if isinstance(n, str) and n != "value"]
  return names[-1] if names else ""


def decay_mask(params: Any) -> Any:
  """A pytree of bools like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: _leaf_name(p) in DECAYED, params
  )


def make_schedule(
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    end_lr_frac: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from 0 to peak_lr, then cosine down to end_lr_frac*peak."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak_lr,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_lr * end_lr_frac,
  )


def make_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optax chain from `config.optim` (lr, warmup_steps, b1, b2, wd, clip)."""
  schedule = make_schedule(
      optim_cfg.lr,
      optim_cfg.warmup_steps,
      total_steps,
      optim_cfg.get("end_lr_frac", 0.0),
  )
  parts = []
  if optim_cfg.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=optim_cfg.b1,
          b2=optim_cfg.b2,
          eps=optim_cfg.get("eps", 1e-8),
          weight_decay=optim_cfg.weight_decay,
          mask=decay_mask,
      )
  )
  return optax.chain(*parts), schedule


def finetune_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Fine-tuning's AdamW: warmup over the first `warmup_frac` of the steps,
  then cosine; everything outside `backbone` (the new heads) at
  `head_lr_mult` x the backbone's learning rate."""
  warmup = int(round(optim_cfg.warmup_frac * total_steps))
  schedule = make_schedule(
      optim_cfg.lr, warmup, total_steps, optim_cfg.end_lr_frac
  )

  def adamw(scale):
    return optax.adamw(
        lambda s: scale * schedule(s),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=decay_mask,
    )

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "backbone"
        if getattr(p[0], "key", None) == "backbone"
        else "head",
        params,
    )

  parts = []
  if optim_cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(
      optax.multi_transform(
          {"backbone": adamw(1.0), "head": adamw(optim_cfg.head_lr_mult)},
          labels,
      )
  )
  return optax.chain(*parts), schedule
