"""The ablation switches (FFN plan, joint masking, routing health) and the
ablation runner (eve_jax/ablate)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eve_jax import flops
from eve_jax.ablate import baselines, report, runner, schedule, tables
from eve_jax.model import router
from eve_jax.model.eve import EVE, num_scanned
from eve_jax.model.heads import EVEPretrainModel
from eve_jax.model.moe_config import MoEConfig
from eve_jax.model.variants import ModelConfig, parse_ffn_plan
from eve_jax.tasks.pretrain import MaskingConfig, PretrainTask
from eve_jax.viz import routing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(cfg: ModelConfig, cls=EVE) -> dict:
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------- FFN plan


def test_an_all_shared_plan_is_a_plain_vit_stack_by_parameter_count():
  """ffn_plan=shared*4: the blocks hold exactly the parameters of a
  4-layer BEiT encoder of the same width (transformers' BeitModel, layer
  scale on, no relative position bias): one FFN per block, no router."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  cfg = ModelConfig.from_config(dict(variant="tiny", ffn_plan="shared*4"))
  assert cfg.ffn_kinds == ("shared",) * 4 and cfg.num_soft_layers == 0
  ours = _size(_params(cfg)["blocks"])
  hf = tf.BeitModel(
      tf.BeitConfig(
          hidden_size=cfg.width,
          num_hidden_layers=cfg.depth,
          num_attention_heads=cfg.heads,
          intermediate_size=cfg.mlp_dim,
          image_size=cfg.image_size,
          patch_size=cfg.patch_size,
          use_relative_position_bias=False,
          layer_scale_init_value=0.1,
      ),
      add_pooling_layer=False,
  )
  del torch
  # transformers >= 5 keeps the blocks in `layers`, older ones in
  # `encoder.layer`.
  layers = hf.layers if hasattr(hf, "layers") else hf.encoder.layer
  assert ours == sum(p.numel() for p in layers.parameters())


def test_the_default_plan_written_out_builds_the_same_model():
  """EVE's layout written as a plan: the same parameters, value for value,
  and the same evaluation output."""
  default = ModelConfig.from_config(dict(variant="tiny"))
  planned = ModelConfig.from_config(
      dict(variant="tiny", ffn_plan="hard*2,soft*2")
  )
  assert planned.ffn_kinds == default.ffn_kinds == ("hard",) * 2 + ("soft",) * 2
  a = EVE(default, rngs=nnx.Rngs(0))
  b = EVE(planned, rngs=nnx.Rngs(0))
  sa, sb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
  jax.tree.map(np.testing.assert_array_equal, sa, sb)


def test_a_plan_places_soft_routers_anywhere():
  """Soft routers in blocks 1 and 3 (0-based): those blocks are MoEs, the
  others hard; an encode reports stats for exactly those two; routing
  keys name them; scan_layers stacks only the hard block below them."""
  cfg = ModelConfig.from_config(
      dict(variant="tiny", ffn_plan="hard,soft,shared,soft")
  )
  assert cfg.soft_layers == cfg.moe_layers == (1, 3)
  model = EVE(cfg, rngs=nnx.Rngs(0))
  kinds = [b.ffn_kind for b in model.blocks]
  assert kinds == ["hard", "soft", "dense", "soft"]
  img = model.embed_image(jnp.zeros((2, 64, 64, 3)))
  txt = model.embed_text(jnp.ones((2, 5), jnp.int32))
  _, stats = model.encode(img, txt, jnp.ones((2, 5), bool))
  assert len(stats) == 2
  counts = np.stack([np.asarray(s.expert_counts) for s in stats])
  keys = routing.metrics(counts, cfg.top_k, list(cfg.soft_layers))
  assert {k.split("/")[1] for k in keys} == {"layer1", "layer3"}
  scanned = ModelConfig.from_config(
      dict(variant="tiny", ffn_plan="hard,soft,hard,soft", scan_layers=True)
  )
  assert num_scanned(scanned) == 1


@pytest.mark.parametrize(
    "model, message",
    [
        (dict(ffn_plan="hard*3"), r"names 3 blocks; model.depth=4"),
        (dict(ffn_plan="hard,dense,soft,soft"), r"'dense' is not one of"),
        (dict(ffn_plan="hard*0,soft*4"), r"'hard\*0' needs a positive count"),
        (
            dict(ffn_plan="hard*2,soft*2", num_soft_layers=3),
            r"has 2 soft blocks but model.num_soft_layers=3; set only",
        ),
    ],
)
def test_a_plan_that_contradicts_the_model_is_one_line(model, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_config(dict(variant="tiny", **model))


def test_parse_ffn_plan():
  assert parse_ffn_plan("soft, hard*2,shared") == (
      "soft",
      "hard",
      "hard",
      "shared",
  )


def test_an_all_hard_plan_has_no_soft_layers_and_no_routing_numbers():
  cfg = ModelConfig.from_config(dict(variant="tiny", ffn_plan="hard*4"))
  assert cfg.num_soft_layers == 0 and cfg.moe_layers == ()
  params = _params(cfg)
  for block in params["blocks"].values():  # one FFN per modality, no router
    assert block["ffn"]["wi"].shape == (2, cfg.width, cfg.mlp_dim)
    assert "kernel" not in block["ffn"]
  assert routing.health(np.zeros((0, 2, 4)), np.zeros((0, 2)), 2, []) == {}


# ----------------------------------------------------- joint masking


def _pretrain_setup(objectives, image_ratio):
  cfg = ModelConfig.from_config(dict(variant="tiny", vocab_size=32))
  model = EVEPretrainModel(cfg, rngs=nnx.Rngs(0))
  task = PretrainTask(
      masking=MaskingConfig(image_mask_ratio=image_ratio),
      mask_id=3,
      cls_id=1,
      vocab_size=32,
      num_special=4,
      objectives=objectives,
  )
  rng = np.random.default_rng(0)
  text = rng.integers(4, 32, size=(4, 9)).astype(np.int32)
  text[:, 0] = 1
  batch = dict(
      image=jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
      text=jnp.asarray(text),
      text_valid=jnp.ones((4, 9), bool),
  )
  return model, task, batch


def test_joint_masking_with_no_image_masked_is_the_mlm_pass():
  """The joint pass sees the visible patches and the masked text: with no
  patch masked, its MLM numbers equal the MLM objective's (same masks,
  same drop-path key), and its MIM loss has nothing to average."""
  model, joint, batch = _pretrain_setup(("joint",), 0.0)
  _, mlm, _ = _pretrain_setup(("mlm",), 0.0)
  rng = jax.random.key(3)
  _, mj = joint.loss(model, batch, rng)
  _, mm = mlm.loss(model, batch, rng)
  np.testing.assert_allclose(float(mj["mlm_loss"]), float(mm["mlm_loss"]))
  assert float(mj["mlm_acc"]) == float(mm["mlm_acc"])
  assert float(mj["mim_loss"]) == 0.0


def test_joint_masking_masks_both_in_one_pass():
  """At 50% / 50%: a MIM loss on half the patches and one pass's MoE
  routing (the two-pass objective routes image tokens twice)."""
  model, joint, batch = _pretrain_setup(("joint",), 0.5)
  model2, both, _ = _pretrain_setup(("mlm", "mim"), 0.5)
  _, mj = joint.loss(model, batch, jax.random.key(0), train=False)
  _, mb = both.loss(model2, batch, jax.random.key(0), train=False)
  assert float(mj["mim_loss"]) > 0 and float(mj["mlm_loss"]) > 0
  # Different passes: the text the MIM decoder's encoder sees is masked.
  assert float(mj["mim_loss"]) != float(mb["mim_loss"])


def test_joint_does_not_mix_with_mlm_or_mim():
  with pytest.raises(ValueError, match="replaces mlm and mim"):
    _pretrain_setup(("joint", "mim"), 0.5)


def test_joint_flops_are_one_pass_over_the_visible_patches():
  cfg = ModelConfig.from_config(dict(variant="tiny"))
  f = flops.train_flops_per_sample(cfg, ("joint", "mlm", "mim"), 0.5)
  assert f["mim"] < f["joint"] < f["mlm"] + f["mim"]


# ------------------------------------------------------ routing health


def test_routing_health_by_hand():
  """Layer 2: every token to expert 0 (top-1, E = 4): load 4 x ideal,
  3 of 4 experts dead, load entropy 0. Layer 3: 8 choices spread evenly:
  load 1 each, none dead, load entropy 1. Router entropies: summed nats
  over tokens per modality, reported per token."""
  counts = np.zeros((2, 2, 4))
  counts[0, 0, 0], counts[0, 1, 0] = 6, 2  # 8 tokens, all to expert 0
  counts[1] = [[1, 1, 1, 1], [1, 1, 1, 1]]
  entropy = np.array([[0.0, 0.0], [4 * np.log(4), 4 * 0.5]])
  h = routing.health(counts, entropy, top_k=1, layers=[2, 3])
  assert h["routing/layer2/load/expert0"] == 4.0
  assert h["routing/layer2/load/expert3"] == 0.0
  assert h["routing/layer2/load_max"] == 4.0
  assert h["routing/layer2/dead_frac"] == 0.75
  assert h["routing/layer2/load_entropy"] == 0.0
  assert h["routing/layer2/router_entropy"] == 0.0
  for e in range(4):
    assert h[f"routing/layer3/load/expert{e}"] == 1.0
  assert h["routing/layer3/dead_frac"] == 0.0
  assert h["routing/layer3/load_entropy"] == pytest.approx(1.0)
  assert h["routing/layer3/image/router_entropy"] == pytest.approx(np.log(4))
  assert h["routing/layer3/text/router_entropy"] == pytest.approx(0.5)
  assert h["routing/layer3/router_entropy"] == pytest.approx(
      (4 * np.log(4) + 2) / 8
  )
  # The Figure 6 keys' parser does not pick these up as experts.
  assert routing.from_metrics(h) == {}


def test_router_entropy_matches_numpy():
  """MoEStats.router_entropy: per modality, the summed entropy of each
  valid token's softmax over experts, against a float64 NumPy one."""
  rng = np.random.default_rng(1)
  g, s, d, e = 2, 6, 8, 4
  x = rng.normal(size=(g, s, d)).astype(np.float32)
  modality = rng.integers(0, 2, size=(g, s)).astype(np.int32)
  valid = np.ones((g, s), bool)
  valid[1, 4:] = False
  kernel = rng.normal(size=(d, e)).astype(np.float32)
  cfg = MoEConfig(e, 2, router="plain")
  out = router.decide(
      router.make_router(cfg),
      {"kernel": jnp.asarray(kernel)},
      cfg,
      jnp.asarray(x),
      jnp.asarray(modality),
      jnp.asarray(valid),
      2,
  )
  logits = x.astype(np.float64) @ kernel.astype(np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1) * valid
  expected = [ent[modality == m].sum() for m in (0, 1)]
  np.testing.assert_allclose(
      np.asarray(out.stats.router_entropy), expected, rtol=1e-5
  )


# --------------------------------------------------------- the runner


def test_rows_shared_by_tables_are_one_run():
  keys = {}
  for t in tables.TABLES.values():
    for r in t.rows:
      keys.setdefault(r.key, set()).add(r.overrides)
  assert all(len(v) == 1 for v in keys.values())  # one key, one override set
  assert tables.get("7").row(tables.EVE.name).key == "eve"
  assert tables.get("8").row("without modality routing").key != "eve"
  with pytest.raises(ValueError, match=r"--table='9' is not one of"):
    tables.get("9")


def test_claims_follow_the_papers_numbers():
  """Each numbered row against the reference, by the mean of the paper's
  five columns (Table 13: 82.98 for soft below vs 82.34 for EVE)."""
  eve = tables.EVE.name
  assert tables.get("8").all_claims() == [(eve, "without modality routing")]
  t13 = tables.get("13").all_claims()
  assert ("Soft router below", eve) in t13 and (eve, "Shared FFN below") in t13
  fig5 = tables.get("fig5").all_claims()
  assert fig5 == list(tables.get("fig5").claims)  # a plot: stated claims only
  assert report.heading(tables.get("fig5")) == "Figure 5"
  assert report.heading(tables.get("13")) == "Table 13"


def test_every_row_is_a_valid_config():
  """Each row's pretraining config builds its model (a typo in a table
  fails here, not hours into a run)."""
  from eve_jax import train  # pylint: disable=g-import-not-at-top

  for t in tables.TABLES.values():
    for r in t.rows:
      c = schedule.pretrain_config(r)
      train.model_config(c, vocab_size=64)
      PretrainTask(
          masking=MaskingConfig(**c.masking),
          mask_id=3,
          cls_id=1,
          vocab_size=64,
          num_special=4,
          objectives=train.parse_objectives(c.objectives),
      )


def test_same_compute_rows_train_fewer_steps():
  t = tables.get("6")
  s = schedule.get_schedule("small")
  itc = schedule.pretrain_steps(t.row("MIM + MLM + ITC"), s, t.row(t.reference))
  itm = schedule.pretrain_steps(
      t.row("MIM + MLM + ITC + ITM"), s, t.row(t.reference)
  )
  ratio = schedule.flops_per_sample(t.row(t.reference)) / (
      schedule.flops_per_sample(t.row("MIM + MLM + ITC"))
  )
  assert itc == round(s.pretrain_steps * ratio)
  assert itm < itc < s.pretrain_steps


def _result(seed, nlvr2, tr, vqa):
  return dict(
      seed=seed,
      numbers=dict(
          nlvr2_dev=nlvr2, nlvr2_test=nlvr2, tr_r1=tr, ir_r1=tr, vqa=vqa
      ),
      cpu_s=60.0,
      wall_s=60.0,
      routing={"routing/layer3/dead_frac": 0.25},
  )


def test_judging_a_claim_by_hand():
  """Means in percent of the five columns; the verdict against the
  standard error of the difference of two seeds each."""
  a = report.summarize([_result(0, 0.8, 0.5, 0.6), _result(1, 0.8, 0.7, 0.6)])
  b = report.summarize([_result(0, 0.7, 0.5, 0.6), _result(1, 0.7, 0.5, 0.6)])
  # a's seeds: (80 + 80 + 50 + 50 + 60) / 5 = 64 and 72 (retrieval 70).
  assert a["score"] == pytest.approx(68.0)
  assert a["score_std"] == pytest.approx(np.std([64, 72], ddof=1))
  assert a["routing_dead_frac"] == 0.25
  verdict, delta = report.judge(a, b)
  # b scores 60 twice: a - b = 8 points > SE = 5.66 / sqrt(2) = 4.
  assert delta == pytest.approx(8.0)
  assert verdict == "reproduced"
  assert report.judge(b, a)[0] == "opposite"
  c = report.summarize([_result(0, 0.7, 0.4, 0.6), _result(1, 0.7, 0.6, 0.6)])
  assert report.judge(c, b)[0] == "within noise"
  assert report.judge(a, {})[0] == "not run"
  # On R@1 alone (TR@1 and IR@1): c ties b at 50, within noise; d leads b
  # by 75 - 50 = 25 points, clear of the standard error 7.07 / sqrt(2) = 5.
  assert report.judge(c, b, "r1") == ("within noise", pytest.approx(0.0))
  d = report.summarize([_result(0, 0.7, 0.7, 0.6), _result(1, 0.7, 0.8, 0.6)])
  assert report.judge(d, b, "r1") == ("reproduced", pytest.approx(25.0))
  assert report.judge(b, d, "r1")[0] == "opposite"


def test_a_report_judges_both_scores_and_shows_the_blind_floor(tmp_path):
  """Table 8's claim judged on all five columns and on R@1 alone, with the
  paper's deltas of each (hand-worked from tables.py), and the blind row
  summarised over seeds."""
  t = tables.get("8")
  eve, plain = t.rows[0].name, t.rows[1].name
  results = {
      # Scores 62 and 78 (SE 8) against 60 twice: +10, reproduced; R@1s
      # 40 and 80 (SE 20) against 50 twice: +10, within noise.
      eve: [_result(0, 0.85, 0.4, 0.6), _result(1, 0.85, 0.8, 0.6)],
      plain: [_result(0, 0.7, 0.5, 0.6), _result(1, 0.7, 0.5, 0.6)],
  }
  blind = {
      s: dict(nlvr2_dev=0.5, nlvr2_test=0.5, tr_r1=0.01, ir_r1=0.01, vqa=v)
      for s, v in ((0, 0.4), (1, 0.38))
  }
  rep = report.build(t, results, blind)
  (claim,) = rep["claims"]
  assert (claim["verdict"], claim["r1_verdict"]) == (
      "reproduced",
      "within noise",
  )
  pe, pp = t.rows[0].paper, t.rows[1].paper
  assert claim["paper_delta"] == pytest.approx(np.mean(pe) - np.mean(pp))
  assert claim["r1_paper_delta"] == pytest.approx(
      (pe[2] + pe[3] - pp[2] - pp[3]) / 2
  )
  assert rep["blind"]["seeds"] == [0, 1]
  assert rep["blind"]["vqa"] == pytest.approx(39.0)
  assert rep["blind"]["score"] == pytest.approx((50 + 50 + 1 + 1 + 39) / 5)
  md = report.markdown(rep, t, str(tmp_path), "cmd")
  assert "without the image" in md and "| 39.0 ± 1.4 |" in md
  # Paper R@1: (94.4 + 81.2 - 93.7 - 80.8) / 2 = +0.55.
  assert "| reproduced | +0.55 | +10.00 | within noise |" in md


def test_the_r1_verdict_follows_the_papers_r1_where_it_differs(tmp_path):
  """Table 11: the paper ranks depth 2 (EVE's row) over depth 4 by its mean
  (+0.02) but depth 4 over depth 2 on R@1 (-0.10). A run where depth 2
  leads on both is the paper's direction on the mean and the opposite of
  it on R@1; the deltas stay first row minus second."""
  t = tables.get("11")
  eve, depth4 = t.rows[0].name, t.rows[1].name
  results = {
      # Scores 74 and 77 against 60 twice: +15.5 (SE 1.5); R@1 70 and 80
      # against 50 twice: +25 (SE 5).
      eve: [_result(0, 0.85, 0.7, 0.6), _result(1, 0.85, 0.8, 0.55)],
      depth4: [_result(0, 0.7, 0.5, 0.6), _result(1, 0.7, 0.5, 0.6)],
  }
  rep = report.build(t, results)
  claim = next(c for c in rep["claims"] if c["worse"] == depth4)
  assert claim["better"] == eve
  assert claim["paper_delta"] == pytest.approx(0.02)
  assert claim["r1_paper_delta"] == pytest.approx(-0.10)
  assert claim["verdict"] == "reproduced"
  assert (claim["r1_verdict"], claim["r1_delta"]) == (
      "opposite",
      pytest.approx(25.0),
  )
  md = report.markdown(rep, t, str(tmp_path), "cmd")
  assert md.startswith("## Table 11: MIM decoder depth\n")
  assert "| -0.10 | +25.00 | opposite |" in md
  # One seed: only the sign, against the paper's R@1 too.
  one = {name: runs[:1] for name, runs in results.items()}
  claim = next(
      c for c in report.build(t, one)["claims"] if c["worse"] == depth4
  )
  assert claim["verdict"] == "same sign, 1 seed"
  assert claim["r1_verdict"] == "opposite, 1 seed"


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_vqa(vqa_dir, split, questions):
  """questions: (id, text, type, multiple_choice_answer, [10 answers])."""
  vqa_dir.mkdir(parents=True, exist_ok=True)
  qs = [dict(question_id=i, question=t, image_id=0) for i, t, *_ in questions]
  anns = [
      dict(
          question_id=i,
          question_type=ty,
          multiple_choice_answer=mc,
          answers=[dict(answer=a) for a in answers],
      )
      for i, _, ty, mc, answers in questions
  ]
  name = f"v2_OpenEnded_mscoco_{split}_questions.json"
  (vqa_dir / name).write_text(json.dumps(dict(questions=qs)))
  name = f"v2_mscoco_{split}_annotations.json"
  (vqa_dir / name).write_text(json.dumps(dict(annotations=anns)))


def test_blind_baselines_by_hand(tmp_path):
  """The text-only priors and retrieval chance of hand-built task files."""
  vqa = tmp_path / "vqa"
  c, n = "what color is the", "how many"
  _write_vqa(
      vqa,
      "train2014",
      [
          (1, "what color is the square?", c, "red", ["red"] * 10),
          (2, "what color is the square?", c, "red", ["red"] * 10),
          (3, "what color is the square?", c, "blue", ["blue"] * 10),
          (4, "how many circles?", n, "2", ["2"] * 10),
      ],
  )
  _write_vqa(
      vqa,
      "val2014",
      [
          # Seen text: 'red' (2 of 3 in training), right: 1.0.
          (10, "what color is the square?", c, "red", ["red"] * 10),
          # Unseen text, seen type: '2', 3 of 10 annotators: 0.9.
          (11, "how many squares?", n, "3", ["2"] * 3 + ["3"] * 7),
          # Unseen type: the most common answer overall, 'red': 0.
          (12, "is there a star?", "is there a", "no", ["no"] * 10),
      ],
  )
  nlvr2 = tmp_path / "nlvr2"

  def rows(split, pairs):  # NLVR2 lines, as the fine-tuning's loader reads
    return [
        dict(identifier=f"{split}-{i}-0-0", directory=0, sentence=s, label=l)
        for i, (s, l) in enumerate(pairs)
    ]

  _write_jsonl(
      nlvr2 / "train.json",
      rows(
          "train",
          [("a", "True"), ("a", "True"), ("a", "False"), ("b", "False")],
      ),
  )
  # 'a' -> True (right), 'b' -> False (wrong), unseen 'c' -> True (right).
  _write_jsonl(
      nlvr2 / "dev.json",
      rows("dev", [("a", "True"), ("b", "True"), ("c", "True")]),
  )
  _write_jsonl(nlvr2 / "test1.json", rows("test1", [("a", "False")]))
  image = lambda split, name, n: dict(
      split=split,
      filename=f"{name}.jpg",
      sentences=[dict(raw=f"caption {k}") for k in range(n)],
  )
  images = [image("train", "t0", 5), image("test", "x1", 1)]
  images.append(image("test", "x2", 3))
  ret = tmp_path / "retrieval"
  ret.mkdir()
  (ret / "dataset_shapes.json").write_text(json.dumps(dict(images=images)))
  got = baselines.blind_numbers(str(tmp_path))
  assert got["vqa"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
  assert got["nlvr2_dev"] == pytest.approx(2 / 3)
  assert got["nlvr2_test"] == 0.0
  # A random ranking of 4 test captions: image 1 finds its one with 1/4,
  # image 2 one of its three with 3/4; a caption finds its image with 1/2.
  assert got["tr_r1"] == pytest.approx(0.5)
  assert got["ir_r1"] == pytest.approx(0.5)


@pytest.mark.slow  # ~7 min on 2 cores: 8 pretraining and fine-tuning stages
def test_an_ablation_smoke_run_resumes_and_reports(tmp_path):
  """Two rows of Table 8, 20 steps per stage, through the command line:
  every stage runs and writes its numbers; the report has both rows and
  the claim; a rerun does nothing (no stage log grows)."""
  cmd = [
      sys.executable,
      "-m",
      "eve_jax.ablate",
      "--table=8",
      "--seeds=0",
      "--schedule=smoke",
      "--parallel=2",
      f"--workdir={tmp_path}",
  ]
  # One CPU device, as a user's run (conftest's XLA_FLAGS make 8).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda: subprocess.run(
      cmd, cwd=REPO, capture_output=True, text=True, env=env
  )
  out = run()
  assert out.returncode == 0, out.stderr[-2000:]
  rep = json.loads((tmp_path / "table8.json").read_text())
  assert [r["seeds"] for r in rep["rows"]] == [[0], [0]]
  for r in rep["rows"]:
    for name, _, _ in tables.COLUMNS:
      assert 0.0 <= r[name] <= 100.0
    assert r["routing_dead_frac"] is not None
  assert rep["claims"][0]["verdict"] in (
      "same sign, 1 seed",
      "opposite, 1 seed",
  )
  # The floor from the seed's real task files: balanced NLVR2 labels and
  # 100 test images of 5 captions each.
  assert rep["blind"]["seeds"] == [0]
  assert 40.0 < rep["blind"]["nlvr2_dev"] < 60.0
  assert rep["blind"]["tr_r1"] == pytest.approx(1.0)
  assert rep["blind"]["ir_r1"] == pytest.approx(1.0)
  md = (tmp_path / "table8.md").read_text()
  assert "without modality routing" in md and "80.3 / 80.7" in md
  logs = sorted(tmp_path.glob("runs/*/seed0/*.log"))
  assert len(logs) == 8
  sizes = [p.stat().st_size for p in logs]
  again = run()
  assert again.returncode == 0, again.stderr[-2000:]
  assert [p.stat().st_size for p in logs] == sizes


def test_a_failing_stage_is_one_line_and_keeps_what_was_done(tmp_path):
  bad = tables.Table(
      "x",
      "a row whose model cannot be built",
      (tables.Row("bad", (("model.ffn_plan", "hard*3"),)),),
      reference="bad",
  )
  with pytest.raises(runner.StageError, match=r"pretrain of row 'bad' seed 0"):
    runner.run_table(
        bad, [0], str(tmp_path), schedule.get_schedule("smoke"), log=lambda s: 0
    )
  assert not list(tmp_path.glob("runs/*/seed0/result.json"))


def test_a_plan_other_than_eves_has_no_released_layout():
  from eve_jax.convert import released_export  # pylint: disable=g-import-not-at-top

  cfg = dict(depth=4, num_soft_layers=2, ffn_plan="soft,soft,hard,hard")
  with pytest.raises(ValueError, match=r"released layout has EVE's blocks"):
    released_export.to_released({"backbone": {}}, cfg)
