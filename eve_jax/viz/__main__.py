r"""Pictures from a trained workdir.

  python -m eve_jax.viz gradcam --workdir DIR --image x.jpg \
      --text "a [MASK] on a pole" --out out.png

What is drawn depends on the run and the text:
  pretraining run, text with [MASK]s: for each mask, the heat map over the
    image for the predicted word (Figure 7; `--target WORD` explains that
    word instead);
  pretraining run, text without [MASK]: 75% of the patches masked at
    random (`--seed`), the weight of each word for reconstructing them
    (Figure 8);
  VQA run (text = the question): the heat map for the top answer
    (Figure 9).
`--method ig` (default) or `gradcam`, `--layer`, `--steps`: see
eve_jax/viz/gradcam.py.

  python -m eve_jax.viz samples --out FOLDER [--num 8] [--size 64]

writes held-out EVE-Shapes images (PNG) and their captions (captions.txt)
to try the commands on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from eve_jax import inference, storage
from eve_jax.data import pipeline, shapes
from eve_jax.inference import InputError
from eve_jax.model.passes import mim_pass
from eve_jax.tasks.pretrain import random_patch_keep
from eve_jax.viz import charts, gradcam, reconstruct
from eve_jax.viz import images as vimg


def _parser() -> inference.ArgumentParser:
  p = inference.ArgumentParser(
      prog="python -m eve_jax.viz", description="Pictures from eve_jax runs."
  )
  sub = p.add_subparsers(dest="command", required=True)
  g = sub.add_parser("gradcam", help="heat maps of what a prediction used")
  g.add_argument("--workdir", required=True)
  g.add_argument("--image", required=True)
  g.add_argument(
      "--text",
      "--question",
      dest="text",
      required=True,
      help="text with [MASK]s, text alone (MIM), or a question",
  )
  g.add_argument("--out", required=True, help="the PNG to write")
  g.add_argument(
      "--target",
      default="",
      help="explain this word at every [MASK] (default: the " "predicted one)",
  )
  g.add_argument("--method", choices=gradcam.METHODS, default="ig")
  g.add_argument("--layer", type=int, default=None)
  g.add_argument("--steps", type=int, default=8)
  g.add_argument("--seed", type=int, default=0, help="MIM patch mask")
  s = sub.add_parser("samples", help="held-out EVE-Shapes images")
  s.add_argument("--out", required=True)
  s.add_argument("--num", type=int, default=8)
  s.add_argument("--size", type=int, default=64)
  s.add_argument("--seed", type=int, default=0)
  return p


def _word(tok, i: int) -> str:
  return tok.decode([int(i)]) or tok.id_to_piece(int(i))


def mlm_figure(w, image, text: str, target: str = "", **kw) -> tuple:
  """Figure 7 for every [MASK] of `text`: (picture, [(mask, word)])."""
  tok = w.tokenizer
  ids, valid, masks = inference.encode_text(tok, text, w.model_cfg.max_text_len)
  n = len(masks)
  tgt = None
  if target:
    pieces = tok.encode(target)
    if len(pieces) != 1:
      raise InputError(
          f"--target {target!r} is not one token of this " "model's vocabulary"
      )
    tgt = np.full((n,), pieces[0])
  heat, words = gradcam.mlm(
      w.model,
      np.repeat(image[None], n, 0),
      np.repeat(ids[None], n, 0),
      np.repeat(valid[None], n, 0),
      np.asarray(masks),
      tgt,
      **kw,
  )
  pic = vimg.to_uint8(image)
  rows = [[pic, vimg.overlay(pic, h, size=128)] for h in heat]
  names = [_word(tok, i) for i in words]
  fig = vimg.grid(
      rows,
      col_titles=("image", "heat map"),
      row_titles=[f"[MASK] {k} -> {word}" for k, word in enumerate(names, 1)],
      title=text,
      cell=128,
  )
  return fig, list(zip(range(1, n + 1), names))


def mim_figure(w, image, text: str, seed: int = 0, **kw) -> tuple:
  """Figure 8: (picture, [(word, weight)])."""
  tok, cfg = w.tokenizer, w.model_cfg
  ids, valid, _ = inference.encode_text(tok, text, cfg.max_text_len)
  ratio = float(w.config.get("masking", {}).get("image_mask_ratio", 0.75))
  norm_pix = bool(w.config.get("masking", {}).get("norm_pix_loss", False))
  keep_idx, patch_mask = random_patch_keep(
      jax.random.key(seed), 1, cfg.num_patches, ratio
  )
  weights = gradcam.mim(
      w.model,
      image[None],
      ids[None],
      valid[None],
      keep_idx,
      patch_mask,
      mask_id=tok.mask_id,
      norm_pix=norm_pix,
      **kw,
  )[0]
  pred, _ = mim_pass(
      w.model, image[None], ids[None], valid[None], keep_idx, None
  )
  orig, masked, recon = reconstruct.panels(
      image,
      np.asarray(pred[0]),
      np.asarray(patch_mask[0]),
      cfg.patch_size,
      norm_pix,
  )
  words = [
      (_word(tok, ids[j]), float(weights[j]))
      for j in range(1, int(valid.sum()))
  ]
  total = sum(v for _, v in words) or 1.0
  words = [(word, v / total) for word, v in words]
  chart = charts.bar_chart(
      [x for x, _ in words],
      {"word weight": [v for _, v in words]},
      title="which words the reconstruction used",
  )
  fig = vimg.vstack(
      [
          vimg.grid(
              [[orig, masked, recon]],
              col_titles=reconstruct.COLUMNS,
              title=f"MIM, {ratio:.0%} of patches masked: {text}",
          ),
          chart,
      ]
  )
  return fig, words


def vqa_figure(w, image, question: str, **kw) -> tuple:
  """Figure 9: (picture, answer)."""
  ids, valid, _ = inference.encode_text(
      w.tokenizer, question, w.model_cfg.max_text_len
  )
  heat, ans = gradcam.vqa(w.model, image[None], ids[None], valid[None], **kw)
  pic = vimg.to_uint8(image)
  name = w.answers[int(ans[0])]
  fig = vimg.grid(
      [[pic, vimg.overlay(pic, heat[0], size=128)]],
      col_titles=("image", f"heat map for {name!r}"),
      title=f"Q: {question}  A: {name}",
      cell=128,
  )
  return fig, name


def _gradcam(args) -> None:
  if not args.out.lower().endswith(".png"):
    raise InputError(f"--out {args.out}: expected a .png file name")
  inference.check_file(args.image)
  w = inference.load(args.workdir, ("pretrain", "vqa"))
  image = inference.read_image(args.image, w.model_cfg.image_size)
  kw = dict(method=args.method, layer=args.layer, steps=args.steps)
  if w.kind == "vqa":
    fig, name = vqa_figure(w, image, args.text, **kw)
    summary = f"answer {name!r}"
  elif inference.MASK in args.text:
    fig, found = mlm_figure(w, image, args.text, args.target, **kw)
    summary = ", ".join(f"[MASK] {k} -> {word}" for k, word in found)
  else:
    fig, words = mim_figure(w, image, args.text, args.seed, **kw)
    summary = "word weights " + " ".join(f"{x}:{v:.2f}" for x, v in words)
  vimg.save_png(args.out, fig)
  print(f"wrote {args.out} ({summary})")


def _samples(args) -> None:
  storage.makedirs(args.out)  # local or gs://
  stream = pipeline.split_seed(args.seed, "eval")
  lines = []
  for i in range(args.num):
    ex = shapes.generate(stream, i, args.size)
    name = f"shapes_{i:03d}.png"
    vimg.save_png(storage.join(args.out, name), ex.image)
    lines.append(f"{name}\t{ex.caption}\n")
  storage.write_text(storage.join(args.out, "captions.txt"), "".join(lines))
  print(f"wrote {args.num} images and captions.txt to {args.out}")


def run(argv: Sequence[str]) -> None:
  args = _parser().parse_args(argv)
  {"gradcam": _gradcam, "samples": _samples}[args.command](args)


if __name__ == "__main__":
  inference.cli_main(run)
