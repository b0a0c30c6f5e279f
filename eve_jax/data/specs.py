"""What one global training batch of each task holds: names, shapes, dtypes.

The data pipelines (pipeline.py, corpora.py, and each fine-tuning task's
`encode_train`) produce these arrays; the trainer compiles its step for
exactly this spec and feeds only these keys, and `python -m
eve_jax.compile` compiles the same step from the spec alone, with no data
on the machine.

Every spec is {name: (shape, dtype)} with shape[0] = B, the global batch;
S is the image size, L the text length, A the number of VQA answers.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

Spec = dict[str, tuple[tuple[int, ...], Any]]


def _image_text(b: int, image_size: int, text_len: int) -> Spec:
  return {
      "image": ((b, image_size, image_size, 3), np.float32),
      "text": ((b, text_len), np.int32),
      "text_valid": ((b, text_len), np.bool_),
  }


def pretrain(batch_size: int, image_size: int, text_len: int) -> Spec:
  """image float32 [B, S, S, 3] in [-1, 1], text int32 [B, L] (CLS first,
  padded), text_valid bool [B, L]."""
  return _image_text(batch_size, image_size, text_len)


def vqa(
    batch_size: int, image_size: int, text_len: int, num_answers: int
) -> Spec:
  """The question as text, and target float32 [B, A]: soft answer scores."""
  spec = _image_text(batch_size, image_size, text_len)
  spec["target"] = ((batch_size, num_answers), np.float32)
  return spec


def nlvr2(batch_size: int, image_size: int, text_len: int) -> Spec:
  """image0, image1 float32 [B, S, S, 3], the statement, label int32 [B]."""
  spec = _image_text(batch_size, image_size, text_len)
  image = spec.pop("image")
  return {
      "image0": image,
      "image1": image,
      **spec,
      "label": ((batch_size,), np.int32),
  }


def retrieval(batch_size: int, image_size: int, text_len: int) -> Spec:
  """A caption per image, image_index int32 [B]: rows with the same index
  show the same image (their captions are all positives)."""
  spec = _image_text(batch_size, image_size, text_len)
  spec["image_index"] = ((batch_size,), np.int32)
  return spec


def local(spec: Spec, rows: int) -> Spec:
  """The same spec with `rows` rows: what one process feeds."""
  return {k: ((rows,) + shape[1:], dtype) for k, (shape, dtype) in spec.items()}


def select(
    batch: Mapping[str, np.ndarray], spec: Spec
) -> dict[str, np.ndarray]:
  """The spec's arrays of a (process-local) batch, in the spec's dtypes.

  Other keys (`index`, `corpus`: bookkeeping of the pipeline) are left
  out. Raises ValueError (one line) for a missing key or another shape.
  """
  out = {}
  for name, (shape, dtype) in spec.items():
    if name not in batch:
      raise ValueError(
          f"the data gave no {name!r} (it has "
          f"{sorted(batch)}); the step needs {sorted(spec)}"
      )
    value = np.asarray(batch[name])
    if value.shape[1:] != tuple(shape[1:]):
      raise ValueError(
          f"the data's {name!r} has rows of shape "
          f"{value.shape[1:]}, the step was built for "
          f"{tuple(shape[1:])}"
      )
    out[name] = value.astype(dtype, copy=False)
  return out
