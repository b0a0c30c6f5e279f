"""Pretraining's data: the built-in EVE-Shapes or prepared corpora, chosen
by the config, as this process's training batches and held-out batches.

  data.dir / data.name="corpora"  -> `corpora.make_dataset` over the mixture
  otherwise (data.name="shapes")  -> `pipeline.make_shapes_dataset`

Batches are dicts of numpy arrays: image [B, H, W, 3] float32 in [-1, 1],
text [B, L] int32, text_valid [B, L] bool (`specs.pretrain` has the
abstract form), B = the global batch / the number of processes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

import ml_collections
import numpy as np

from eve_jax import storage
from eve_jax.data import corpora
from eve_jax.data import pipeline as data_pipeline
from eve_jax.data.errors import DataError

if TYPE_CHECKING:
  from eve_jax.model.variants import ModelConfig


def uses_corpora(config: ml_collections.ConfigDict) -> bool:
  """Prepared corpora (`data.dir`) rather than the built-in EVE-Shapes."""
  return bool(config.data.dir) or config.data.name == "corpora"


def corpora_tokenizer(config: ml_collections.ConfigDict) -> str:
  """`data.tokenizer`, else DIR/tokenizer.model; a one-line error naming
  the command that makes it when there is none."""
  if config.data.tokenizer:
    return config.data.tokenizer
  root = os.path.abspath(os.path.expanduser(config.data.dir))
  path = os.path.join(root, "tokenizer.model")
  if not os.path.isfile(path):
    dirs = " ".join(
        c.directory
        for c in corpora.parse_mixture(config.data.dir, config.data.mixture)
    )
    raise DataError(
        f"no tokenizer: set --config.data.tokenizer or make "
        f"{path} with `{corpora.PREPARE} tokenizer --out {path} "
        f"{dirs}`"
    )
  return path


def check_data(config: ml_collections.ConfigDict, workdir: str = "") -> None:
  """Fails fast, in one line, when the configured data cannot be read."""
  if uses_corpora(config):
    mix = corpora.parse_mixture(config.data.dir, config.data.mixture)
    corpora.open_splits(mix, "train")
    if not storage.isfile(os.path.join(workdir, "tokenizer.model")):
      tok = corpora_tokenizer(config)
      if not storage.isfile(tok):
        raise DataError(f"config.data.tokenizer={tok} does not exist")
    return
  if config.data.name != "shapes":
    raise DataError(
        f"config.data.name={config.data.name!r} is not one of "
        "'shapes', 'corpora'"
    )


def _corpora_data(config, tokenizer, model_cfg: ModelConfig, **kw):
  return corpora.make_dataset(
      corpora.parse_mixture(config.data.dir, config.data.mixture),
      seed=config.seed,
      image_size=model_cfg.image_size,
      tokenizer=tokenizer,
      max_text_len=model_cfg.max_text_len,
      num_threads=config.data.num_threads,
      **kw,
  )


def eval_corpora(config) -> list[corpora.Corpus]:
  """The mixture's corpora that hold an eval split (`prepare
  --eval_images`); pretraining evaluates on those."""
  return [
      c
      for c in corpora.parse_mixture(config.data.dir, config.data.mixture)
      if os.path.isfile(os.path.join(c.directory, "eval_pairs.npy"))
  ]


def _shapes_dataset(config, tokenizer, model_cfg: ModelConfig, **kw):
  """EVE-Shapes batches at the model's image size and text length."""
  return data_pipeline.make_shapes_dataset(
      seed=config.seed,
      image_size=model_cfg.image_size,
      tokenizer=tokenizer,
      max_text_len=model_cfg.max_text_len,
      **kw,
  )


def make_train_data(
    config, tokenizer, model_cfg: ModelConfig, shard: tuple[int, int] = (0, 1)
):
  """This process's training batches: shard (index, count) of the records,
  batch_size / count rows per batch (see `sharding.process_batch_slice`)."""
  index, count = shard
  if uses_corpora(config):
    return _corpora_data(
        config,
        tokenizer,
        model_cfg,
        split="train",
        batch_size=config.train.batch_size // count,
        process_index=index,
        process_count=count,
    )
  return _shapes_dataset(
      config,
      tokenizer,
      model_cfg,
      split="train",
      batch_size=config.train.batch_size // count,
      process_index=index,
      process_count=count,
  )


def eval_batches(
    config, tokenizer, model_cfg: ModelConfig, shard: tuple[int, int] = (0, 1)
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the held-out set.

  Every batch has eval_batch_size / count rows, padding rows marked by
  `example_valid` False (one compiled shape), and every process yields the
  same number of batches (the eval step is one program across processes).
  """
  index, count = shard
  bs = config.train.eval_batch_size // count
  rows = -(-config.train.eval_examples // count)  # the largest shard
  num_batches = -(-rows // bs)
  if uses_corpora(config):
    mix = eval_corpora(config)
    if not mix:
      return
    it = corpora.make_dataset(
        mix,
        split="eval",
        seed=config.seed,
        batch_size=bs,
        image_size=model_cfg.image_size,
        tokenizer=tokenizer,
        max_text_len=model_cfg.max_text_len,
        process_index=index,
        process_count=count,
        train=False,
        num_examples=config.train.eval_examples,
        num_threads=config.data.num_threads,
    )
  else:
    it = iter(
        _shapes_dataset(
            config,
            tokenizer,
            model_cfg,
            split="eval",
            batch_size=bs,
            num_examples=config.train.eval_examples,
            shuffle=False,
            repeat=False,
            drop_remainder=False,
            process_index=index,
            process_count=count,
        )
    )
  size, length = model_cfg.image_size, model_cfg.max_text_len
  empty = dict(
      image=np.zeros((0, size, size, 3), np.float32),
      text=np.zeros((0, length), np.int32),
      text_valid=np.zeros((0, length), bool),
  )
  for _ in range(num_batches):
    # A shard that ran out first (or lost images that do not decode) pads
    # with all-padding batches.
    batch = next(it, None) or empty
    batch = {k: batch[k] for k in empty}
    n = batch["text"].shape[0]
    batch["example_valid"] = np.ones((n,), bool)
    if n < bs:
      batch = {
          k: np.concatenate([v, np.zeros((bs - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()
      }
    yield batch
