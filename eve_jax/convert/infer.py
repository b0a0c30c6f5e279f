"""Running a converted (or any eve_jax) checkpoint on a user's images and
text: features, VQA answers, image-text scores.

  python -m eve_jax.convert run --model DIR --image cat.jpg \
      --text "what is the cat doing?" [--top 5] [--save out.npz]

Images are resized (bicubic) to the model's resolution and normalized with
mean = std = 0.5, as the released evaluation transform does; text is
tokenized with DIR's tokenizer and padded to `max_text_len`.

Legend: B batch, L = Li + Lt tokens, D width, A answers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eve_jax import pretrained
from eve_jax.convert import output
from eve_jax.convert.source import ConversionError
from eve_jax.data import finetune_data
from eve_jax.data.tokenizer import load_tokenizer


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
  """Image files -> float32 [B, size, size, 3] in [-1, 1], read as
  fine-tuning evaluation reads them (`finetune_data.read_image`)."""
  try:
    return np.stack([finetune_data.read_image(p, size) for p in paths])
  except ValueError as e:  # DataError: one line naming the file
    raise ConversionError(str(e)) from None


def image_text_outputs(
    model, images: jax.Array, text: jax.Array, text_valid: jax.Array
) -> dict[str, jax.Array]:
  """Every output the backbone gives for B (image, text) pairs.

  Returns:
    states [B, L, D] of the fused pass, image_states [B, Li, D] of an
    image-only pass, image_features [B, D] (their CLS) and, when there is
    text, text_cls [B, D] (the fused pass's text CLS) and text_features
    [B, D] (text CLS of a text-only pass). The features are taken before
    the final LayerNorm when `model.retrieval_eval_features` says
    "pre_norm" (the released retrieval evaluation), else after it.
  """
  bb = model.backbone
  normed = bb.cfg.retrieval_eval_features == "normed"
  img, txt = bb.embed_image(images), bb.embed_text(text)
  raw, _ = bb.encode(img, txt[:, :0], text_valid[:, :0], final_norm=False)
  image_only = bb.norm(raw)
  out = {
      "states": image_only,
      "image_states": image_only,
      "image_features": (image_only if normed else raw)[:, 0],
  }
  if text.shape[1]:  # without text (a converted BEiT) the passes coincide
    states, _ = bb.encode(img, txt, text_valid)
    raw, _ = bb.encode(txt[:, :0], txt, text_valid, final_norm=False)
    out.update(
        states=states,
        text_cls=states[:, img.shape[1]],
        text_features=(bb.norm(raw) if normed else raw)[:, 0],
    )
  return out


_outputs = nnx.jit(image_text_outputs)
_call = nnx.jit(lambda model, *args: model(*args))


def run(
    directory: str,
    image_paths: Sequence[str],
    texts: Sequence[str],
    top: int = 5,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Loads DIR and runs it on the pairs (image_paths[i], texts[i]) (an
  NLVR2 model: on (image_paths[2i], image_paths[2i + 1], texts[i])), with
  `overrides` of its config.model (`inference.model_overrides`).

  Returns:
    (a JSON-able summary: per image the VQA top answers, the ITM/ITC
    scores or the NLVR2 probability of "true", and feature norms; the
    arrays by name).
  """
  try:
    model, config = output.load(directory, overrides=overrides)
  except TypeError as e:  # a value of the wrong kind for its field
    raise ConversionError(f"--set: {e}") from None
  nlvr2 = bool(texts) and "nlvr2" in config.get("heads", [])
  if nlvr2:  # a statement about two images: one text per image pair
    if len(image_paths) != 2 * len(texts):
      raise ConversionError(
          f"NLVR2 model: {len(image_paths)} images but "
          f"{len(texts)} texts: give two --image per "
          "--text"
      )
    texts = [t for t in texts for _ in range(2)]
  elif texts and len(image_paths) != len(texts):
    raise ConversionError(
        f"{len(image_paths)} images but {len(texts)} "
        "texts: give one --text per --image (or none)"
    )
  cfg = model.backbone.cfg
  images = jnp.asarray(load_images(image_paths, cfg.image_size))
  if texts:
    tok = load_tokenizer(pretrained.tokenizer_path(directory))
    ids, valid = tok.encode_batch(list(texts), cfg.max_text_len)
  else:  # image features only (e.g. a converted BEiT, which has no text)
    tok = None
    ids = np.zeros((len(image_paths), 0), np.int32)
    valid = ids.astype(bool)
  arrays = {
      k: np.asarray(v)
      for k, v in _outputs(
          model, images, jnp.asarray(ids), jnp.asarray(valid)
      ).items()
  }
  rows = [{"image": p} for p in image_paths]
  if tok is not None:
    for row, t, r, m in zip(rows, texts, ids, valid):
      row.update(text=t, tokens=[tok.id_to_piece(i) for i, v in zip(r, m) if v])
  else:
    config = dict(config, heads=[])  # the heads need text
  heads = config.get("heads", [])
  if "vqa" in heads:
    logits, _ = _call(model, images, jnp.asarray(ids), jnp.asarray(valid))
    arrays["vqa_logits"] = np.asarray(logits)
    answers = _answers(directory, logits.shape[-1])
    probs = jax.nn.sigmoid(logits)  # soft-score BCE: independent answers
    for row, p in zip(rows, np.asarray(probs)):
      best = np.argsort(-p)[:top]
      row["vqa"] = [[answers[i], round(float(p[i]), 4)] for i in best]
  if nlvr2:
    logits, _ = _call(
        model,
        images[0::2],
        images[1::2],
        jnp.asarray(ids[0::2]),
        jnp.asarray(valid[0::2]),
    )
    arrays["nlvr2_logits"] = np.asarray(logits)
    p_true = np.asarray(jax.nn.softmax(logits, -1))[:, 1]
    for i, p in enumerate(p_true):
      rows[2 * i]["nlvr2_true_prob"] = round(float(p), 4)
  if "retrieval" in heads:
    m = model.matching
    sims = m.similarities(
        jnp.asarray(arrays["image_features"]),
        jnp.asarray(arrays["text_features"]),
    )
    match = nnx.jit(type(model).match_scores)(
        model, images, jnp.asarray(ids), jnp.asarray(valid)
    )
    arrays["itc_similarity"] = np.asarray(sims)
    arrays["itm_log_prob"] = np.asarray(match)
    for i, row in enumerate(rows):
      row["itc"] = round(float(sims[i, i]), 4)
      row["itm_prob"] = round(float(np.exp(match[i])), 4)
  for i, row in enumerate(rows):
    row["feature_norms"] = {
        k: round(float(np.linalg.norm(arrays[k][i])), 4)
        for k in ("image_features", "text_features", "text_cls")
        if k in arrays
    }
  summary = {"model": os.path.abspath(directory), "pairs": rows}
  if overrides:
    summary["overrides"] = dict(overrides)
  return summary, arrays


def _answers(directory: str, n: int) -> list[str]:
  path = os.path.join(directory, "answers.json")
  if os.path.isfile(path):
    with open(path) as f:
      answers = json.load(f)
    if len(answers) == n:
      return [str(a) for a in answers]
  return [f"answer_{i}" for i in range(n)]
