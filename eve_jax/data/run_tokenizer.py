"""The run's tokenizer: DIR/tokenizer.model, made once and read after.

Pretraining trains one on EVE-Shapes captions or copies the prepared
corpora's (`pretrain_tokenizer`); fine-tuning passes its own maker (the
init_from run's tokenizer). With several processes only process 0 makes it.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from eve_jax import storage
from eve_jax.data import sources
from eve_jax.data.errors import DataError
from eve_jax.data.tokenizer import Tokenizer, load_tokenizer, shapes_tokenizer


def build_tokenizer(
    config: ml_collections.ConfigDict, workdir: str, make=None
) -> Tokenizer:
  """The run's tokenizer, saved in DIR/tokenizer.model (made once by
  `make(config, path)`, default `pretrain_tokenizer`).

  With several processes, process 0 makes the file and the others read it
  (the workdir must be on a filesystem every process sees).
  """
  make = make or pretrain_tokenizer
  path = os.path.join(workdir, "tokenizer.model")
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      make(config, path)
    multihost_utils.sync_global_devices("eve_jax tokenizer written")
    if not storage.exists(path):
      raise DataError(
          f"process {jax.process_index()} cannot see {path} that "
          "process 0 wrote: the workdir must be on a filesystem "
          "shared by all processes"
      )
    return load_tokenizer(path)
  return make(config, path)


def copy_tokenizer(source: str, path: str) -> Tokenizer:
  """Loads the tokenizer at `source` (one-line error if it cannot) and
  copies it to `path`, the run's own."""
  try:
    tok = load_tokenizer(source)
  except (OSError, RuntimeError) as e:
    raise DataError(
        f"cannot read the tokenizer {source}: "
        f"{str(e).strip().splitlines()[0][:200]}"
    ) from None
  storage.write_bytes(path, storage.read_bytes(source))
  return tok


def pretrain_tokenizer(config, path: str) -> Tokenizer:
  """Pretraining's: DIR/tokenizer.model once made; else `data.tokenizer`,
  the prepared corpora's, or (EVE-Shapes) one trained on its captions."""
  if storage.exists(path):
    return load_tokenizer(path)
  source = config.data.tokenizer
  if not source and sources.uses_corpora(config):
    source = sources.corpora_tokenizer(config)
  if source:
    return copy_tokenizer(source, path)
  if config.data.name == "shapes":
    return shapes_tokenizer(
        path,
        vocab_size=config.data.vocab_size,
        num_captions=config.data.num_tokenizer_captions,
        seed=config.seed,
    )
  raise DataError(
      f"config.data.tokenizer is empty and data {config.data.name!r} "
      "has no built-in tokenizer"
  )
