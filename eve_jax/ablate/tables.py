"""The paper's ablation tables as rows of config overrides, with its numbers.

Each row is a set of `--config.KEY=VALUE` overrides of the small ablation
recipe (eve_jax/ablate/schedule.py): keys under `model.` apply to
pretraining and to every fine-tuning task (a fine-tuned model must have the
pretrained one's parameters); the rest (objectives, masking, optim) to
pretraining only. Rows with the same overrides are one run, shared by every
table that has them (EVE's own row is in most).

The paper's ablations use a 12-layer EVE-Base-like model; the recipe here
is configs/base.py:tiny's 4 layers with soft routers in the top 2 (of 4,
not of 12), so block positions are mapped: the paper's top-2 layers are
blocks 3-4, its bottom-10 blocks 1-2. Paper numbers: NLVR2 dev / test-P
accuracy, Flickr30K text / image retrieval R@1, VQAv2 test-dev, in percent.
Figures 4 and 5 are plots: their rows carry the paper's stated directions
(`claims`) and no numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

# The paper's columns, and the eval.json key each EVE-Shapes run fills it
# with (task, key): NLVR2's dev and test-P splits, retrieval's R@1 on the
# test images, VQA accuracy.
COLUMNS = (
    ("nlvr2_dev", "nlvr2", "nlvr2_acc"),
    ("nlvr2_test", "nlvr2", "nlvr2_acc_test"),
    ("tr_r1", "retrieval", "tr_r1"),
    ("ir_r1", "retrieval", "ir_r1"),
    ("vqa", "vqa", "vqa_acc"),
)
# Also recorded: the retrieval mean recall (Figure 5's right axis) and what
# pretraining itself reached.
EXTRA = (
    ("r_mean", "retrieval", "r_mean"),
    ("mlm_acc", "pretrain", "mlm_acc"),
    ("mim_loss", "pretrain", "mim_loss"),
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a table.

  Attributes:
    name: as the paper labels it.
    overrides: config key -> value (ConfigDict paths, as on the command
      line without `--config.`).
    paper: the paper's five numbers (COLUMNS order) or None for a plot.
    same_flops_as: for "the same pre-training compute" (Table 6): the name
      of the row whose analytic training FLOPs this row's step count
      matches (eve_jax/flops.py), None to train the recipe's steps.
  """

  name: str
  overrides: tuple[tuple[str, object], ...] = ()
  paper: tuple[float, ...] | None = None
  same_flops_as: str | None = None

  @property
  def key(self) -> str:
    """The run's directory name: readable, plus a hash of the overrides (and
    the compute rule) so that rows differing in any value never share."""
    if not self.overrides and not self.same_flops_as:
      return "eve"
    text = json.dumps([sorted(self.overrides), self.same_flops_as])
    short = ",".join(
        f"{k.split('.')[-1]}={v}" for k, v in sorted(self.overrides)
    )
    short = re.sub(r"[^A-Za-z0-9=,.+-]", "_", short)[:60]
    return f"{short}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclasses.dataclass(frozen=True)
class Table:
  """A paper table (or figure) as rows.

  Attributes:
    number: "5", "7", ..., or "fig5".
    title: what it ablates.
    rows: its rows; `reference` names the one its claims compare against.
    claims: (better, worse) row names the paper says order that way; for a
      table with numbers, every row against `reference` by the mean of the
      paper's five columns is added by `all_claims`.
    notes: how rows map to the small model.
  """

  number: str
  title: str
  rows: tuple[Row, ...]
  reference: str
  claims: tuple[tuple[str, str], ...] = ()
  notes: str = ""

  def row(self, name: str) -> Row:
    for r in self.rows:
      if r.name == name:
        return r
    raise KeyError(f"table {self.number} has no row {name!r}")

  def all_claims(self) -> list[tuple[str, str]]:
    """(better, worse) pairs: the stated ones, then each numbered row
    against the reference by the paper's mean."""
    out = list(self.claims)
    ref = self.row(self.reference)
    if ref.paper is None:
      return out
    ref_mean = sum(ref.paper) / len(ref.paper)
    for r in self.rows:
      if r.name == ref.name or r.paper is None:
        continue
      mean = sum(r.paper) / len(r.paper)
      pair = (r.name, ref.name) if mean > ref_mean else (ref.name, r.name)
      if pair not in out and mean != ref_mean:
        out.append(pair)
    return out


EVE = Row("EVE (MIM + MLM, soft router top 2)", (), None)


def _eve(paper) -> Row:
  return dataclasses.replace(EVE, paper=paper)


def _rows(*rows: Row) -> tuple[Row, ...]:
  names = [r.name for r in rows]
  assert len(set(names)) == len(names), names
  return rows


TABLES: dict[str, Table] = {
    "5": Table(
        "5",
        "Pretraining tasks: MIM, MLM, both at once, both",
        _rows(
            Row(
                "MIM only",
                (("objectives", "mim"),),
                (57.2, 57.4, 30.4, 22.9, 60.9),
            ),
            Row(
                "MLM only",
                (("objectives", "mlm"),),
                (78.8, 79.3, 92.2, 79.2, 77.0),
            ),
            Row(
                "MIM + MLM in one pass, 50% / 50% masked",
                (
                    ("objectives", "joint"),
                    ("masking.image_mask_ratio", 0.5),
                    ("masking.text_mask_ratio", 0.5),
                ),
                (75.4, 75.7, 88.6, 74.2, 74.6),
            ),
            _eve((79.7, 80.1, 93.9, 80.7, 77.3)),
        ),
        reference=EVE.name,
        notes="Masked at once: one pass over the visible 50% of the patches "
        "and the text with 50% of its words masked, both heads on it.",
    ),
    "6": Table(
        "6",
        "More pretraining tasks at the same pretraining compute",
        _rows(
            EVE,
            Row(
                "MIM + MLM + ITC",
                (("objectives", "mlm,mim,itc"),),
                None,
                same_flops_as=EVE.name,
            ),
            Row(
                "MIM + MLM + ITC + ITM",
                (("objectives", "mlm,mim,itc,itm"),),
                None,
                same_flops_as=EVE.name,
            ),
        ),
        reference=EVE.name,
        claims=(
            (EVE.name, "MIM + MLM + ITC"),
            (EVE.name, "MIM + MLM + ITC + ITM"),
        ),
        notes="Same compute = the same analytic training FLOPs "
        "(eve_jax/flops.py): the added objectives train fewer steps. The "
        "paper reports Flickr TR / IR and VQA only: MIM + MLM 94.4 / 81.2 / "
        "77.4; its other rows (94.0/80.0/76.8, 94.0/80.7/77.0, 94.2/80.8/77.1) "
        "lost their check marks in the text, so only its claim that MIM + "
        "MLM alone is best is compared.",
    ),
    "7": Table(
        "7",
        "FFN of the top 2 blocks",
        _rows(
            Row(
                "Shared FFN",
                (("model.ffn_plan", "hard*2,shared*2"),),
                (79.6, 80.1, 93.5, 80.1, 77.0),
            ),
            Row(
                "Shared FFN, one more block",
                (("model.depth", 5), ("model.ffn_plan", "hard*2,shared*3")),
                (80.1, 80.2, 93.9, 80.6, 77.1),
            ),
            Row(
                "Hard router",
                (("model.ffn_plan", "hard*4"),),
                (79.8, 80.1, 93.2, 79.3, 77.0),
            ),
            _eve((80.3, 80.7, 94.4, 81.2, 77.4)),
            Row(
                "Soft router, L_aux = 0",
                (("model.aux_loss_weight", 0.0),),
                (79.2, 80.0, 93.6, 79.7, 77.1),
            ),
        ),
        reference=EVE.name,
        notes="The soft router of EVE's row is the default (4 experts, top "
        "2). L_aux = 0 holds in pretraining and fine-tuning.",
    ),
    "8": Table(
        "8",
        "Modality routing in the soft router",
        _rows(
            _eve((80.3, 80.7, 94.4, 81.2, 77.4)),
            Row(
                "without modality routing",
                (("model.moe_router", "plain"),),
                (79.7, 80.0, 93.7, 80.8, 77.3),
            ),
        ),
        reference=EVE.name,
        notes="Without modality routing the router is softmax(W x) "
        "(model.moe_router=plain): no modality embedding added to the "
        "router's or the experts' input.",
    ),
    "11": Table(
        "11",
        "MIM decoder depth",
        _rows(
            _eve((79.7, 80.2, 93.6, 80.1, 77.2)),
            Row(
                "decoder depth 4",
                (("model.decoder_depth", 4),),
                (79.3, 80.4, 93.5, 80.4, 77.1),
            ),
            Row(
                "decoder depth 8",
                (("model.decoder_depth", 8),),
                (79.7, 80.1, 93.9, 80.7, 77.3),
            ),
        ),
        reference=EVE.name,
        notes="EVE's row is depth 2 (the tiny decoder; the paper's 2-depth "
        "row). Depth 12 left out at this size.",
    ),
    "12": Table(
        "12",
        "Position of the soft-router blocks",
        _rows(
            _eve((79.7, 80.1, 93.9, 80.7, 77.3)),
            Row(
                "blocks 2 and 4 (paper 10, 12)",
                (("model.ffn_plan", "hard,soft,hard,soft"),),
                (79.6, 79.8, 93.3, 80.4, 77.2),
            ),
            Row(
                "blocks 2, 3 (paper 6, 7)",
                (("model.ffn_plan", "hard,soft,soft,hard"),),
                (78.6, 79.2, 92.3, 78.4, 76.7),
            ),
            Row(
                "blocks 1, 2 (paper 1, 2)",
                (("model.ffn_plan", "soft,soft,hard,hard"),),
                (79.0, 79.7, 92.8, 78.7, 76.9),
            ),
        ),
        reference=EVE.name,
        notes="EVE's row has the soft routers in blocks 3, 4 (the paper's "
        "11, 12) of 4.",
    ),
    "13": Table(
        "13",
        "FFN of the bottom blocks",
        _rows(
            Row(
                "Shared FFN below",
                (("model.ffn_plan", "shared*2,soft*2"),),
                (79.3, 79.6, 93.7, 80.5, 76.6),
            ),
            _eve((79.7, 80.1, 93.9, 80.7, 77.3)),
            Row(
                "Soft router below",
                (("model.ffn_plan", "soft*4"),),
                (80.8, 80.5, 95.0, 81.1, 77.5),
            ),
        ),
        reference=EVE.name,
        notes="The paper's bottom 10 of 12 blocks are blocks 1-2 of 4 here.",
    ),
    "fig5": Table(
        "fig5",
        "Number of experts and top-k",
        _rows(
            Row("4 experts, top-1", (("model.top_k", 1),)),
            EVE,  # 4 experts, top-2
            Row(
                "8 experts, top-1",
                (("model.num_experts", 8), ("model.top_k", 1)),
            ),
            Row("8 experts, top-2", (("model.num_experts", 8),)),
        ),
        reference=EVE.name,
        claims=(
            (EVE.name, "4 experts, top-1"),
            ("8 experts, top-2", "8 experts, top-1"),
            ("8 experts, top-2", EVE.name),
            ("4 experts, top-1", "8 experts, top-1"),
        ),
        notes="The paper's Figure 5 (16 and 32 experts too; soft routers in "
        "its blocks 8, 10, 12). Its claims: top-2 beats top-1; at top-2 "
        "more experts help; at top-1 more experts hurt (mostly retrieval).",
    ),
    "fig4": Table(
        "fig4",
        "Masking ratios",
        _rows(
            Row("image 50%", (("masking.image_mask_ratio", 0.5),)),
            EVE,  # image 75%, text 50%
            Row("image 90%", (("masking.image_mask_ratio", 0.9),)),
            Row("text 25%", (("masking.text_mask_ratio", 0.25),)),
            Row("text 75%", (("masking.text_mask_ratio", 0.75),)),
        ),
        reference=EVE.name,
        claims=((EVE.name, "image 50%"), (EVE.name, "text 25%")),
        notes="EVE's row: image 75%, text 50%. The paper's claims: a "
        "higher image masking ratio is better, and a higher text one too.",
    ),
}


def get(number: str) -> Table:
  """TABLES[number], or a one-line error listing them."""
  if number not in TABLES:
    raise ValueError(f"--table={number!r} is not one of {sorted(TABLES)}")
  return TABLES[number]
