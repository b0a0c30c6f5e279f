"""Does Grad-CAM point at the right object? Measured on EVE-Shapes.

For held-out records (the generator's eval stream), one object's color
word is masked ("a small [MASK] circle left of ..."), the MLM Grad-CAM map
for the true color word is computed (`gradcam.mlm`), and compared with the
generator's mask of that object (`shapes.Example.object_masks`):

  hit      the map's highest patch cell overlaps the object (the pointing
           game);
  mass     the share of the map's total on cells that overlap the object.

Two chance levels come with them: `chance_cell`, the hit rate of a cell
drawn at random (the share of cells the object touches), and
`chance_object`, that of a map that finds an object but picks one of the
image's objects at random (1 / number of objects): only a map that knows
which object the word is about beats the second.
"""

from __future__ import annotations

import numpy as np

from eve_jax.data import pipeline, shapes, transforms
from eve_jax.model.passes import mlm_pass
from eve_jax.viz import gradcam


def color_word_examples(
    tokenizer,
    *,
    seed: int,
    num: int,
    image_size: int,
    max_text_len: int,
    min_objects: int = 1,
) -> dict[str, np.ndarray]:
  """The first `num` held-out records with >= min_objects objects, each
  with the color word of object (index mod objects) masked.

  Returns:
    image [num, H, W, 3] normalized, text_in [num, L] (one [MASK]),
    text_valid [num, L], position [num] of the [MASK], target [num] the
    color's token id, object_mask [num, H, W] of that object, any_object
    [num, H, W] of all objects, num_objects [num], index [num] record ids
    in the eval stream.
  """
  stream = pipeline.split_seed(seed, "eval")
  rows = []
  index = 0
  while len(rows) < num:
    ex = shapes.generate(stream, index, image_size)
    n = len(ex.objects)
    if n >= min_objects:
      k = index % n
      words = ex.caption.split()
      color_word = 6 * k + 2  # "a SIZE COLOR SHAPE left of ..."
      assert words[color_word] == ex.objects[k].color
      ids, position = [tokenizer.cls_id], 0
      for w, word in enumerate(words):
        pieces = tokenizer.encode(word)
        if w == color_word:
          if len(pieces) != 1:
            raise ValueError(f"color {word!r} is not one token")
          position, target = len(ids), pieces[0]
          pieces = [tokenizer.mask_id]
        ids.extend(pieces)
      text = np.full((max_text_len,), tokenizer.pad_id, np.int32)
      text[: len(ids)] = ids
      rows.append(
          dict(
              image=transforms.normalize_image(ex.image),
              text_in=text,
              text_valid=np.arange(max_text_len) < len(ids),
              position=position,
              target=target,
              object_mask=ex.object_masks[k],
              any_object=ex.object_masks.any(0),
              num_objects=n,
              index=index,
          )
      )
    index += 1
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score(
    heat: np.ndarray, object_mask: np.ndarray, num_objects: np.ndarray
) -> dict[str, float]:
  """Hit rate, mass and chance levels (module docstring) of [B, g, g]
  maps against [B, H, W] object masks."""
  g = heat.shape[-1]
  touched = np.stack([gradcam.cell_coverage(m, g) > 0 for m in object_mask])
  flat = heat.reshape(len(heat), -1)
  best = flat.argmax(-1)
  hits = touched.reshape(len(heat), -1)[np.arange(len(heat)), best]
  total = np.maximum(flat.sum(-1), 1e-12)
  mass = (flat * touched.reshape(len(heat), -1)).sum(-1) / total
  return dict(
      hit_rate=float(hits.mean()),
      mass=float(mass.mean()),
      chance_cell=float(touched.mean()),
      chance_object=float(np.mean(1.0 / num_objects)),
      num_images=int(len(heat)),
  )


def measure(
    model,
    tokenizer,
    *,
    seed: int = 0,
    num: int = 50,
    min_objects: int = 1,
    method: str = "ig",
    layer: int | None = None,
    steps: int = 8,
) -> dict[str, float]:
  """Localization of masked color words over `num` held-out EVE-Shapes
  images (see the module docstring) by `gradcam.mlm` with this method
  (the baseline image: the EVE-Shapes background alone), plus how often
  the model's top prediction at the mask is the right color (`top1_acc`).
  """
  cfg = model.cfg
  ex = color_word_examples(
      tokenizer,
      seed=seed,
      num=num,
      image_size=cfg.image_size,
      max_text_len=cfg.max_text_len,
      min_objects=min_objects,
  )
  blank = transforms.normalize_image(shapes.blank_image(cfg.image_size))
  heat, _ = gradcam.mlm(
      model,
      ex["image"],
      ex["text_in"],
      ex["text_valid"],
      ex["position"],
      ex["target"],
      blank=blank,
      method=method,
      layer=layer,
      steps=steps,
  )
  logits, _ = mlm_pass(
      model, ex["image"], ex["text_in"], ex["text_valid"], None
  )
  top = np.asarray(logits)[np.arange(num), ex["position"]].argmax(-1)
  out = score(heat, ex["object_mask"], ex["num_objects"])
  out["top1_acc"] = float((top == ex["target"]).mean())
  return out
