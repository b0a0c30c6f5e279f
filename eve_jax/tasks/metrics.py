"""Downstream metrics: retrieval recall and rerank, NLVR2 accuracy (the
VQA metric is eve_jax/tasks/vqa_metric.py).

Pure Python / numpy, no JAX: these run on host over gathered predictions.

  Retrieval: recall@K for text retrieval (image -> texts, hit if any of the
       image's captions is in the top K) and image retrieval (text ->
       images), as in ALBEF / ViLT / EVE, with ties resolved explicitly
       against the correct item (see `retrieval_recall`), plus the ITC
       top-k -> ITM rerank (`rerank_topk`).
  NLVR2: plain accuracy.

All rates are fractions in [0, 1], not percent.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------


def retrieval_recall(
    sims: np.ndarray,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    row_chunk: int = 1024,
) -> dict[str, float]:
  """Recall@K for text retrieval (TR) and image retrieval (IR).

  TR, per image: rank all texts by sims[image]; a hit at K if the image's
  best-ranked caption (any of its captions, e.g. 5 in COCO / Flickr30K) is
  within the top K. IR, per text: rank all images by sims[:, text]; a hit at
  K if its image is within the top K.

  Ties are resolved explicitly and pessimistically, never by array order:
  the 0-based rank of the correct item is the number of WRONG items whose
  score is >= its score (strictly greater ones, plus tied ones, which are
  put before it). So a correct item tied with a wrong one misses R@1. For
  TR the correct item is the image's highest-scoring caption, and ties
  between two of the image's own captions cost nothing (either one is
  right). -inf scores (e.g. outside the reranked top k) are ordinary
  values, so a correct item at -inf has rank >= the number of finite wrong
  items; NaN is rejected.

  Args:
    sims: [num_images, num_texts] similarity (higher = more similar).
    text_to_image: [num_texts] the image id (row) of each text; every image
      must have at least one text.
    ks: the K values.
    row_chunk: images (TR) or texts (IR) per chunk; bounds the boolean
      temporaries to [row_chunk, num_texts] / [num_images, row_chunk].

  Returns:
    {"tr_r{K}": ..., "ir_r{K}": ... for each K, "r_mean": mean of all
    of them}, as fractions in [0, 1].
  """
  sims = np.asarray(sims)
  if sims.ndim != 2:
    raise ValueError(f"sims must be [num_images, num_texts], got {sims.shape}")
  num_images, num_texts = sims.shape
  t2i = np.asarray(text_to_image, dtype=np.int64)
  if t2i.shape != (num_texts,):
    raise ValueError(
        f"text_to_image has shape {t2i.shape}, sims has " f"{num_texts} texts"
    )
  if num_texts == 0 or num_images == 0:
    raise ValueError("retrieval_recall needs at least one image and text")
  if t2i.min() < 0 or t2i.max() >= num_images:
    raise ValueError(f"text_to_image out of range [0, {num_images})")
  if np.bincount(t2i, minlength=num_images).min() == 0:
    raise ValueError("every image needs at least one text")
  if np.isnan(sims).any():
    raise ValueError("sims contains NaN")

  # TR: rank of each image's best caption among the wrong texts.
  tr_rank = np.empty((num_images,), np.int64)
  for start in range(0, num_images, row_chunk):
    rows = sims[start : start + row_chunk]
    own = t2i[None, :] == np.arange(start, start + rows.shape[0])[:, None]
    best = np.where(own, rows, -np.inf).max(axis=1)
    tr_rank[start : start + rows.shape[0]] = (
        (rows >= best[:, None]) & ~own
    ).sum(axis=1)

  # IR: rank of each text's image among the other images; the correct
  # image itself always satisfies >=, hence the - 1.
  correct = sims[t2i, np.arange(num_texts)]
  ir_rank = np.empty((num_texts,), np.int64)
  for start in range(0, num_texts, row_chunk):
    cols = sims[:, start : start + row_chunk]
    ir_rank[start : start + cols.shape[1]] = (
        cols >= correct[None, start : start + cols.shape[1]]
    ).sum(axis=0) - 1

  out = {}
  for k in ks:
    out[f"tr_r{k}"] = float(np.mean(tr_rank < k))
  for k in ks:
    out[f"ir_r{k}"] = float(np.mean(ir_rank < k))
  out["r_mean"] = float(np.mean(list(out.values())))
  return out


def rerank_topk(
    itc_sims: np.ndarray,
    k: int,
    score_fn: Callable[[int, np.ndarray], np.ndarray],
) -> np.ndarray:
  """Rescore each row's top-k ITC candidates; everything else -> -inf.

  The ALBEF / EVE retrieval protocol: ITM (expensive, one fused pass per
  pair) scores only the k (128) best candidates of the cheap ITC ranking.
  Rows are queries; for text -> image ranking pass the transpose and
  transpose the result back. ALBEF's final score is ITM + ITC; if that is
  wanted, score_fn adds itc_sims[row, candidates] itself.

  Args:
    itc_sims: [num_queries, num_candidates] ITC similarities.
    k: candidates per row to rescore (clamped to num_candidates).
    score_fn: score_fn(row, candidate_indices int64 [k]) -> [k] scores for
      those candidates of that row. The candidates come in descending ITC
      order, ties by lower index (a stable sort).

  Returns:
    [num_queries, num_candidates] float (float32 unless itc_sims is
    float64): score_fn's scores at each row's top-k, -inf elsewhere.
  """
  itc_sims = np.asarray(itc_sims)
  if itc_sims.ndim != 2:
    raise ValueError(f"itc_sims must be 2-D, got {itc_sims.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  k = min(k, itc_sims.shape[1])
  dtype = np.result_type(itc_sims.dtype, np.float32)
  out = np.full(itc_sims.shape, -np.inf, dtype=dtype)
  # Stable sort of the negation: descending score, ties by lower index.
  topk = np.argsort(-itc_sims, axis=1, kind="stable")[:, :k]
  for row in range(itc_sims.shape[0]):
    candidates = topk[row]
    scores = np.asarray(score_fn(row, candidates))
    if scores.shape != (k,):
      raise ValueError(
          f"score_fn returned shape {scores.shape} for row "
          f"{row}, expected ({k},)"
      )
    out[row, candidates] = scores
  return out


# ---------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------


def nlvr2_accuracy(predictions: Sequence, labels: Sequence) -> float:
  """Fraction of predictions equal to their labels ([N] each, N >= 1)."""
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise ValueError(
        f"predictions {predictions.shape} and labels "
        f"{labels.shape} must be equal-length vectors"
    )
  if predictions.size == 0:
    raise ValueError("nlvr2_accuracy of no examples")
  return float(np.mean(predictions == labels))
