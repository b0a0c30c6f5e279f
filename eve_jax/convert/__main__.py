"""python -m eve_jax.convert {beitv2,eve,run} ...

  beitv2 --in CKPT.pth --out DIR [--heads H] [--image-size S]
         [--soft-layers N] [--experts E] [--drop PREFIX ...]
      A BEiT / BEiTv2 checkpoint (Hugging Face, unilm or timm layout) ->
      DIR for `--config.init_from=DIR` (backbone only; text embeddings,
      routers and absolute positions are left to the model).
  eve --in CKPT.th --tokenizer TOKENIZER_DIR --out DIR [--heads H]
      [--answers answer_list.json] [--drop PREFIX ...]
      The released EVE weights (pretrained, VQA or retrieval fine-tuned) ->
      DIR with its Hugging Face tokenizer (tokenizer.json).
  run --model DIR --image IMG [--text TEXT] [--image IMG [--text TEXT] ...]
      [--top K] [--save OUT.npz] [--set model.KEY=VALUE ...]
      Runs DIR on image-text pairs: prints JSON (VQA answers, ITC/ITM
      scores, feature norms); --save writes the arrays.

Each conversion writes DIR/conversion_report.json (loaded, new, dropped,
initialized, with shapes) and prints its one-line summary. Bad input is
one line, `eve_jax: error: ...`, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

_INFER_NOTE = (
    "The converted model reproduces the released computation "
    "when fine-tuned/run with the config.model in config.json "
    "(quick_gelu, moe_normalize_gates, capacity_factor 1.0)."
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m eve_jax.convert", description=__doc__.split("\n")[0]
  )
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("beitv2", help="BEiT/BEiTv2 checkpoint -> eve_jax")
  b.add_argument("--in", dest="inp", required=True)
  b.add_argument("--out", required=True)
  b.add_argument(
      "--heads",
      type=int,
      default=None,
      help="attention heads (default: from the relative "
      "position bias table, else width / 64)",
  )
  b.add_argument("--image-size", type=int, default=None)
  b.add_argument(
      "--soft-layers",
      type=int,
      default=None,
      help="soft-router blocks at the top (default: variant's)",
  )
  b.add_argument("--experts", type=int, default=None)
  e = sub.add_parser("eve", help="released EVE checkpoint -> eve_jax")
  e.add_argument("--in", dest="inp", required=True)
  e.add_argument(
      "--tokenizer",
      required=True,
      help="the released tokenizer's directory (tokenizer.json, "
      "or files transformers' AutoTokenizer reads) or its "
      "tokenizer.json",
  )
  e.add_argument("--out", required=True)
  e.add_argument(
      "--heads",
      type=int,
      default=None,
      help="attention heads (default: the checkpoint's config, "
      "else the released sizes' 12 for width 768 and 16 for "
      "1024; required for any other width)",
  )
  e.add_argument(
      "--answers",
      default=None,
      help="VQA answer list (JSON list of strings), copied to "
      "DIR/answers.json",
  )
  for q in (b, e):
    q.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="PREFIX",
        help="leave out tensors whose name starts with PREFIX "
        "(heads this converter does not know); reported",
    )
  r = sub.add_parser("run", help="run a converted model on images + text")
  r.add_argument("--model", required=True)
  r.add_argument("--image", action="append", required=True)
  r.add_argument(
      "--text",
      action="append",
      default=[],
      help="one per --image; none: image features only",
  )
  r.add_argument("--top", type=int, default=5)
  r.add_argument("--save", default=None)
  r.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="model.KEY=VALUE",
      help="run with this config.model key changed, e.g. "
      "model.capacity_factor=0 (repeatable)",
  )
  return p


def tokenizer_json(path: str) -> str:
  """The released tokenizer as tokenizer.json text: the file itself, DIR/
  tokenizer.json, or (other Hugging Face files) what transformers'
  AutoTokenizer builds from DIR."""
  from eve_jax.convert.source import ConversionError  # pylint: disable=g-import-not-at-top

  candidates = [path, os.path.join(path, "tokenizer.json")]
  for c in candidates:
    if os.path.isfile(c):
      with open(c, encoding="utf-8") as f:
        return f.read()
  if not os.path.isdir(path):
    raise ConversionError(f"--tokenizer {path}: no such file or directory")
  try:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    tok = AutoTokenizer.from_pretrained(path)
    return tok.backend_tokenizer.to_str()
  except Exception as e:  # transformers raises many kinds
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise ConversionError(
        f"--tokenizer {path}: no tokenizer.json and "
        f"transformers cannot read it ({first})"
    ) from None


def _beitv2(args) -> None:
  from eve_jax.convert import beit, output, source  # pylint: disable=g-import-not-at-top

  sd = source.state_dict(source.load_torch(args.inp), args.inp)
  params, model_cfg, pieces = beit.convert(
      sd,
      args.inp,
      heads=args.heads,
      image_size=args.image_size,
      num_soft_layers=args.soft_layers,
      num_experts=args.experts,
      drop=args.drop,
  )
  rep = output.report(params, model_cfg, pieces, args.inp)
  rep["layout"] = pieces["layout"]
  output.write(
      args.out,
      params,
      {
          "model": model_cfg,
          "converted_from": os.path.abspath(args.inp),
          "layout": pieces["layout"],
      },
      rep,
  )
  print(
      f"{args.out}: BEiT ({pieces['layout']} layout) -> eve_jax: "
      f"{rep['summary']}"
  )


def _eve(args) -> None:
  from eve_jax.convert import output, released, source  # pylint: disable=g-import-not-at-top
  from eve_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top

  obj = source.load_torch(args.inp)
  sd = source.strip_prefix(source.state_dict(obj, args.inp), ("module.",))
  params, model_cfg, pieces = released.from_released(
      sd,
      args.inp,
      args.heads,
      args.drop,
      checkpoint_config=obj.get("config") if isinstance(obj, dict) else None,
  )
  text = tokenizer_json(args.tokenizer)
  with tempfile.TemporaryDirectory() as tmp:  # checked before writing DIR
    tok_path = os.path.join(tmp, "tokenizer.json")
    with open(tok_path, "w", encoding="utf-8") as f:
      f.write(text)
    tok = HFTokenizer(tok_path)
  if tok.vocab_size != model_cfg["vocab_size"]:
    raise source.ConversionError(
        f"--tokenizer {args.tokenizer} has {tok.vocab_size} tokens but "
        f"{args.inp} backbone.word_embedding.weight has "
        f"{model_cfg['vocab_size']} rows"
    )
  heads = tuple(pieces["heads"])
  answers = pieces.get("vqa_answers", 0)
  rep = output.report(params, model_cfg, pieces, args.inp, heads, answers)
  rep["differences_from_released_code"] = released.DIFFERENCES
  rep["attention_heads"] = [model_cfg["heads"], pieces["attention_heads_from"]]
  if args.answers:  # checked before anything is written
    with open(args.answers) as f:
      names = json.load(f)
    if not isinstance(names, list):
      raise source.ConversionError(
          f"--answers {args.answers} is not a JSON " "list of answers"
      )
    if len(names) != answers:
      raise source.ConversionError(
          f"--answers {args.answers} lists {len(names)} answers but the VQA "
          f"head of {args.inp} has {answers}"
      )
  config = {
      "model": model_cfg,
      "heads": list(heads),
      "converted_from": os.path.abspath(args.inp),
  }
  if answers:
    config["vqa_answers"] = answers
  output.write(args.out, params, config, rep, tokenizer_json=text)
  if args.answers:
    output.copy_file(args.answers, args.out, "answers.json")
  print(
      f"{args.out}: released EVE ({', '.join(heads) or 'backbone'}) -> "
      f"eve_jax: {rep['summary']}. {_INFER_NOTE}"
  )


def _run(args) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from eve_jax.convert import infer  # pylint: disable=g-import-not-at-top
  from eve_jax.inference import model_overrides  # pylint: disable=g-import-not-at-top

  summary, arrays = infer.run(
      args.model, args.image, args.text, args.top, model_overrides(args.set)
  )
  if args.save:
    np.savez(args.save, **arrays)
    summary["saved"] = os.path.abspath(args.save)
  print(json.dumps(summary, indent=1))


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    {"beitv2": _beitv2, "eve": _eve, "run": _run}[args.cmd](args)
  except (ValueError, OSError) as e:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"eve_jax: error: {msg}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
