r"""Predictions from a trained workdir, on your own images.

  python -m eve_jax.predict --workdir DIR fill --image x.jpg \
      --text "a small [MASK] circle"
  python -m eve_jax.predict --workdir DIR vqa --image x.jpg \
      --question "what color is the circle?"
  python -m eve_jax.predict --workdir DIR retrieve --images FOLDER \
      --text "a large red circle"

fill: a pretraining workdir (the MLM head); prints the top words for each
[MASK] and the text with the top ones filled in.
vqa: a VQA fine-tuning workdir (configs/vqa.py); prints the top answers
with their scores (sigmoid of the answer logit, as trained with BCE).
retrieve: a retrieval fine-tuning workdir (configs/retrieval.py), or a
pretraining workdir whose objectives included itc; ranks the folder's
images by ITC similarity (`--itm`: by the ITM match probability, the
paper's rerank, here over every image of the folder).

Bad input (no such workdir, another kind of run, an image that does not
decode, fill text without [MASK]) is one `eve_jax: error:` line, exit 1.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eve_jax import inference
from eve_jax.inference import InputError
from eve_jax.model.passes import mlm_pass


def _word(tokenizer, i: int) -> str:
  return tokenizer.decode([i]) or tokenizer.id_to_piece(i)


def fill_logits(model, images, text, valid) -> np.ndarray:
  """[B, H, W, 3], [B, Lt] with [MASK]s -> [B, Lt, V] MLM probabilities."""
  logits, _ = mlm_pass(
      model, jnp.asarray(images), jnp.asarray(text), jnp.asarray(valid), None
  )
  return np.asarray(jax.nn.softmax(logits, -1))


def fill(
    w: inference.Workdir, image: np.ndarray, text: str, top: int = 5
) -> tuple[list[list[tuple[str, float]]], str]:
  """The top words for each [MASK] of `text` and the text with the best
  ones filled in.

  Args:
    w: a pretraining workdir.
    image: [H, W, 3] normalized.
    text: words with one or more "[MASK]".
    top: words per mask.
  """
  ids, valid, masks = inference.encode_text(
      w.tokenizer, text, w.model_cfg.max_text_len
  )
  if not masks:
    raise InputError(f"--text {text!r} has no {inference.MASK} to fill")
  probs = fill_logits(w.model, image[None], ids[None], valid[None])[0]
  out, filled = [], []
  for p in masks:
    order = np.argsort(-probs[p])[:top]
    out.append(
        [(_word(w.tokenizer, int(i)), float(probs[p, i])) for i in order]
    )
  parts = text.split(inference.MASK)
  for i, part in enumerate(parts):
    filled.append(part)
    if i < len(out):
      filled.append(out[i][0][0])
  return out, " ".join("".join(filled).split())


def answer(
    w: inference.Workdir, image: np.ndarray, question: str, top: int = 5
) -> list[tuple[str, float]]:
  """The top answers to `question` with their scores (sigmoid)."""
  ids, valid, _ = inference.encode_text(
      w.tokenizer, question, w.model_cfg.max_text_len
  )
  logits, _ = w.model(
      jnp.asarray(image[None]), jnp.asarray(ids[None]), jnp.asarray(valid[None])
  )
  scores = np.asarray(jax.nn.sigmoid(logits[0]))
  order = np.argsort(-scores)[:top]
  return [(w.answers[int(i)], float(scores[i])) for i in order]


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)


@functools.lru_cache(maxsize=4)
def _retrieval_scores(graphdef):
  """The jitted (state, [n, H, W, 3] images, one text [1, Lt], valid) ->
  ([n] ITC cosine, [n] ITM match probability) of a model's graph (one
  compile however many calls)."""

  @jax.jit
  def scores(state, imgs, ids, valid):
    m = nnx.merge(graphdef, state)
    bb, heads, n = m.backbone, m.matching, imgs.shape[0]
    txt = bb.embed_text(ids)
    t_states, _ = bb.encode(txt[:, :0], txt, valid)
    t_emb = _unit(heads.text_proj(t_states[:, 0]))[0]
    emb = bb.embed_image(imgs)
    nothing = jnp.zeros((n, 0), jnp.int32)
    i_states, _ = bb.encode(emb, bb.embed_text(nothing), nothing > 0)
    sim = _unit(heads.image_proj(i_states[:, 0])) @ t_emb
    fused, _ = bb.encode(
        emb, bb.embed_text(ids.repeat(n, 0)), valid.repeat(n, 0)
    )
    logits = heads.match_logits(fused[:, emb.shape[1]])
    return sim, jax.nn.softmax(logits, -1)[:, 1]

  return scores


def retrieve(
    w: inference.Workdir,
    paths: Sequence[str],
    text: str,
    itm: bool = False,
    batch: int = 32,
) -> list[tuple[str, float, float | None]]:
  """The images at `paths` ranked for `text`: (path, ITC cosine
  similarity, ITM match probability or None), best first."""
  if not w.has_matching_heads:
    raise InputError(
        f"--workdir {w.path} is a {w.kind} run without "
        "ITC/ITM heads: retrieve needs a retrieval run "
        "(configs/retrieval.py) or pretraining with objective "
        "itc"
    )
  cfg = w.model_cfg
  ids, valid, _ = inference.encode_text(w.tokenizer, text, cfg.max_text_len)
  graphdef, state = nnx.split(w.model)
  scores = _retrieval_scores(graphdef)
  sims, matches = [], []
  for s in range(0, len(paths), batch):
    imgs = np.stack(
        [inference.read_image(p, cfg.image_size) for p in paths[s : s + batch]]
    )
    n = len(imgs)
    # One compiled shape: the last batch padded with copies, cut after.
    imgs = np.concatenate([imgs, np.repeat(imgs[:1], batch - n, 0)])
    sim, match = scores(state, imgs, ids[None], valid[None])
    sims.append(np.asarray(sim)[:n])
    matches.append(np.asarray(match)[:n])
  sim, match = np.concatenate(sims), np.concatenate(matches)
  order = np.argsort(-(match if itm else sim), kind="stable")
  return [
      (paths[i], float(sim[i]), float(match[i]) if itm else None) for i in order
  ]


def _parser() -> inference.ArgumentParser:
  p = inference.ArgumentParser(
      prog="python -m eve_jax.predict",
      description="Predictions from a trained eve_jax workdir.",
  )
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="model.KEY=VALUE",
      help="run with this config.model key changed (repeatable)",
  )
  sub = p.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fill", help="the words behind each [MASK]")
  f.add_argument("--image", required=True)
  f.add_argument("--text", required=True, help='e.g. "a small [MASK] circle"')
  f.add_argument("--top", type=int, default=5)
  q = sub.add_parser("vqa", help="answer a question about an image")
  q.add_argument("--image", required=True)
  q.add_argument("--question", required=True)
  q.add_argument("--top", type=int, default=5)
  r = sub.add_parser("retrieve", help="rank a folder's images for a text")
  r.add_argument("--images", required=True, help="a folder of images")
  r.add_argument("--text", required=True)
  r.add_argument("--top", type=int, default=10)
  r.add_argument(
      "--itm",
      action="store_true",
      help="rank by the ITM head's match probability",
  )
  return p


def run(argv: Sequence[str]) -> None:
  args = _parser().parse_args(argv)
  kinds = {
      "fill": ("pretrain",),
      "vqa": ("vqa",),
      "retrieve": ("retrieval", "pretrain"),
  }[args.command]
  # Check the cheap inputs before loading the model.
  if args.command == "retrieve":
    paths = inference.list_images(args.images)
  else:
    inference.check_file(args.image)
  if args.command == "fill" and inference.MASK not in args.text:
    raise InputError(f"--text {args.text!r} has no {inference.MASK} to fill")
  w = inference.load(args.workdir, kinds, inference.model_overrides(args.set))
  size = w.model_cfg.image_size
  if args.command == "fill":
    preds, filled = fill(
        w, inference.read_image(args.image, size), args.text, args.top
    )
    for k, words in enumerate(preds, 1):
      print(f"[MASK] {k}: " + "  ".join(f"{word} {p:.3f}" for word, p in words))
    print(f"filled: {filled}")
  elif args.command == "vqa":
    top = answer(
        w, inference.read_image(args.image, size), args.question, args.top
    )
    width = max(len(a) for a, _ in top)
    for k, (a, s) in enumerate(top, 1):
      print(f"{k}. {a:<{width}}  {s:.3f}")
  else:
    ranked = retrieve(w, paths, args.text, itm=args.itm)
    head = "rank  itc_sim" + ("  itm_prob" if args.itm else "") + "  image"
    print(head)
    for k, (path, sim, match) in enumerate(ranked[: args.top], 1):
      m = f"  {match:8.3f}" if match is not None else ""
      print(f"{k:4d}  {sim:7.3f}{m}  {path}")


def main() -> None:
  inference.cli_main(run)


if __name__ == "__main__":
  main()
