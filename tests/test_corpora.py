"""The pipeline over prepared corpora: crops, sharding, mixing, skipping bad
images, exact resume, and pretraining on a corpus end to end.

The corpora are written here with `records.CorpusWriter` from EVE-Shapes
renders (JPEG and PNG), one record holding bytes that are no image.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eve_jax import config_lib, trainer
from eve_jax.data import corpora, records, shapes, transforms
from eve_jax.data.tokenizer import shapes_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(
      buf, format=fmt, **(dict(quality=95) if fmt == "JPEG" else {})
  )
  return buf.getvalue()


def _write_corpus(directory, name, n, *, seed, bad=(), eval_images=0):
  """n EVE-Shapes images (every 3rd with a second caption); records in
  `bad` hold bytes that do not decode. Returns {split: [(pair, caption)]}."""
  pairs = {"train": [], "eval": []}
  with records.CorpusWriter(directory, name, records_per_shard=16) as w:
    for i in range(n + eval_images):
      ex = shapes.generate(seed, i, SIZE)
      caps = [ex.caption] + (
          [shapes.generate_caption(seed + 1, i)] if i % 3 == 0 else []
      )
      data = (
          b"\xff\xd8 not a jpeg"
          if i in bad
          else _encode(ex.image, "JPEG" if i % 2 else "PNG")
      )
      split = "train" if i < n else "eval"
      for c in caps:
        pairs[split].append((i in bad, c))
      w.add(data, caps, str(i), name, split=split)
  return pairs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """DATA/a (40 images, 53 pairs, record 5 bad, 8 eval images) and DATA/b
  (12 images), plus DATA/tokenizer.model."""
  d = tmp_path_factory.mktemp("data")
  _write_corpus(str(d / "a"), "a", 40, seed=1, bad={5}, eval_images=8)
  _write_corpus(str(d / "b"), "b", 12, seed=2)
  shapes_tokenizer(str(d / "tokenizer.model"), vocab_size=64, num_captions=500)
  return str(d)


@pytest.fixture(scope="module")
def tokenizer(root):
  from eve_jax.data.tokenizer import Tokenizer

  return Tokenizer(os.path.join(root, "tokenizer.model"))


def _dataset(root, tokenizer, mixture="a", **kw):
  kw = dict(
      dict(
          split="train",
          seed=0,
          batch_size=4,
          image_size=32,
          max_text_len=17,
          num_threads=2,
      ),
      **kw,
  )
  return corpora.make_dataset(
      corpora.parse_mixture(root, mixture), tokenizer=tokenizer, **kw
  )


# --- transforms --------------------------------------------------------------


def test_crop_boxes_cover_half_to_all_of_the_image_within_the_ratios():
  rng = np.random.default_rng(0)
  for width, height in ((640, 480), (37, 41)):
    areas = []
    for _ in range(300):
      l, t, r, b = transforms.crop_box(width, height, rng)
      assert 0 <= l < r <= width and 0 <= t < b <= height
      w, h = r - l, b - t
      # Whole pixels: area and ratio off by at most a row or a column.
      assert 0.5 * width * height - w - h <= w * h <= width * height
      assert 3 / 4 - 1 / h <= w / h <= 4 / 3 + 1 / h
      areas.append(w * h / (width * height))
    assert min(areas) < 0.55 and max(areas) > 0.95  # the whole range used
  # No box of half the area within 3/4..4/3 fits: the central fallback, the
  # largest box of ratio 3/4.
  for _ in range(5):
    assert transforms.crop_box(100, 300, rng) == (0, 83, 100, 216)


def test_decode_flips_and_crops_real_pixels():
  """A left-red / right-blue JPEG: evaluation keeps the sides, a flip swaps
  them, and every augmented view stays red-left or blue-left, never mixed
  into another color."""
  image = np.zeros((96, 128, 3), np.uint8)
  image[:, :64, 0] = 255
  image[:, 64:, 2] = 255
  data = _encode(image, "JPEG")
  out = transforms.decode(data, 32, None)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert out[:, :12, 0].mean() > 200 and out[:, -12:, 2].mean() > 200
  flips = 0
  rng = np.random.default_rng(1)
  for _ in range(40):
    view = transforms.decode(data, 32, rng).astype(int)
    left, right = view[:, :4].mean((0, 1)), view[:, -4:].mean((0, 1))
    if left[2] > left[0]:  # blue on the left: flipped
      flips += 1
      assert right[0] > right[2]
  assert 10 <= flips <= 30
  with pytest.raises(Exception):
    transforms.decode(b"\xff\xd8 not a jpeg", 32, rng)


# --- the dataset -------------------------------------------------------------


def test_two_processes_read_disjoint_halves_covering_an_epoch_once(
    root, tokenizer
):
  """Shuffled training order, one batch row at a time: the first epoch of
  each process's shard; together every decodable pair exactly once, and the
  record that does not decode skipped and counted in exactly one of them."""
  split = records.CorpusSplit(os.path.join(root, "a"))
  bad = set(range(*split.pairs[5:7]))  # the pairs of record 5
  seen, skipped = [], 0
  for p in (0, 1):
    shard = list(range(split.num_pairs))[p::2]
    it = _dataset(
        root, tokenizer, batch_size=1, process_index=p, process_count=2
    )
    got = [
        int(next(it)["index"][0])
        for _ in range(len(shard) - len(bad & set(shard)))
    ]
    assert sorted(got) == sorted(set(shard) - bad)
    assert got != sorted(got)  # shuffled
    seen += got
    skipped += it.skipped
  assert sorted(seen) == sorted(set(range(split.num_pairs)) - bad)
  assert skipped == len(bad)


def test_a_restored_iterator_yields_bitwise_the_same_batches(root, tokenizer):
  it = _dataset(root, tokenizer, mixture="a,b")
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint has it
  want = [next(it) for _ in range(20)]  # past an epoch: a reshuffle
  again = _dataset(root, tokenizer, mixture="a,b")
  again.set_state(state)
  for a, b in zip(want, (next(again) for _ in range(20))):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert again.skipped == it.skipped >= 1


def test_mixture_weights_set_the_share_of_each_corpus(root, tokenizer):
  """a:3,b:1 over 400 rows: 3/4 from a, whatever their sizes; by default
  the shares follow the pair counts (a 53, b 16)."""
  for mixture, share in (("a:3,b:1", 0.75), ("a,b", 53 / 69)):
    it = _dataset(root, tokenizer, mixture=mixture, batch_size=100)
    corpus = np.concatenate([next(it)["corpus"] for _ in range(4)])
    assert abs(np.mean(corpus == 0) - share) < 0.02, mixture


def test_batches_hold_normalized_images_and_tokenized_captions(root, tokenizer):
  batch = next(
      _dataset(root, tokenizer, split="eval", train=False, batch_size=8)
  )
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  split = records.CorpusSplit(os.path.join(root, "a"), "eval")
  for row in range(8):
    r, k = split.pair(int(batch["index"][row]))
    ids = batch["text"][row][batch["text_valid"][row]]
    assert ids[0] == tokenizer.cls_id
    assert tokenizer.decode(ids[1:]) == split[r]["captions"][k]


def test_missing_data_gives_one_line_errors_naming_the_fix(root, tmp_path):
  with pytest.raises(corpora.DataError, match="prepare coco .*--out "):
    corpora.parse_mixture(root, "a,coco")
  with pytest.raises(corpora.DataError, match="does not exist"):
    corpora.parse_mixture(str(tmp_path / "nowhere"), "")
  with pytest.raises(corpora.DataError, match="weight"):
    corpora.parse_mixture(root, "a:x")
  # A shard deleted after `prepare`: named, not a traceback from tfds.
  broken = tmp_path / "broken"
  _write_corpus(str(broken / "c"), "c", 20, seed=3)
  os.remove(
      next(
          str(p)
          for p in (broken / "c").iterdir()
          if "array_record-00001" in p.name
      )
  )
  with pytest.raises(
      corpora.DataError, match="broken/c.*00001-of-00002 is " "missing"
  ):
    corpora.open_splits(corpora.parse_mixture(str(broken), ""), "train")
  # One cut in half: named too.
  _write_corpus(str(broken / "d"), "d", 20, seed=3)
  shard = next(
      str(p) for p in (broken / "d").iterdir() if "array_record-00000" in p.name
  )
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(corpora.DataError, match="00000-of-00002 cannot be read"):
    corpora.open_splits(corpora.parse_mixture(str(broken), "d"), "train")


# --- end to end --------------------------------------------------------------


def _tiny_on(root):
  """configs/base.py:tiny with --config.data.dir, two layers (compile time)."""
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.data.dir = root
  c.data.num_threads = 2
  c.model.update(dict(depth=2, decoder_depth=1))
  c.train.update(
      dict(
          steps=6,
          batch_size=8,
          log_every=1,
          eval_every=0,
          checkpoint_every=3,
          eval_examples=8,
          eval_batch_size=8,
      )
  )
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow  # ~2.5 min of training
def test_tiny_pretrains_on_a_prepared_corpus_and_resumes_exactly(
    root, tmp_path
):
  """Trains, evaluates on the held-out images, logs the skipped ones; a run
  stopped after its step-3 checkpoint and resumed logs bitwise the losses
  of the run that never stopped."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  ev = trainer.run(_tiny_on(root), a).eval
  assert ev["num_masked_tokens"] > 0 and "mlm_acc_blank" in ev
  assert "mlm_acc_visual" not in ev  # real corpora have no such word list
  rows = _rows(a)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  # 48 rows of `a` (53 pairs, 2 of them the bad record's) and `b`: the bad
  # image comes up once or twice.
  assert 1 <= rows[-1]["data_skipped"] <= 2

  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "6"))
  with open(os.path.join(b, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:3])
  trainer.run(_tiny_on(root), b)
  rows_b = _rows(b)
  assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(rows[3:], rows_b[3:]):
    for key in ("loss", "mlm_loss", "mim_loss", "data_skipped"):
      assert ra[key] == rb[key], (ra["step"], key)

  # Resuming on a shard cut since: one line naming it; the run's files are
  # untouched.
  from test_reliability import snapshot  # pylint: disable=g-import-not-at-top

  cut = str(tmp_path / "cut")
  shutil.copytree(root, cut)
  shard = next(
      str(p)
      for p in (tmp_path / "cut" / "a").iterdir()
      if "array_record-00000" in p.name
  )
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[: len(data) // 3])
  before = snapshot(b)
  c = _tiny_on(cut)
  c.train.steps = 8
  with pytest.raises(corpora.DataError, match="00000-of-.* cannot be read"):
    trainer.run(c, b)
  assert snapshot(b) == before


def test_data_bench_reports_samples_per_core(root):
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "eve_jax.data.bench",
          "--config=configs/base.py:tiny",
          f"--config.data.dir={root}",
          "--config.data.num_threads=2",
          "--batch_size=8",
          "--batches=4",
          "--warmup=1",
          "--json",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["data"] == "corpora" and result["samples_per_s"] > 0
  assert result["samples_per_s_per_core"] == pytest.approx(
      result["samples_per_s"] / result["cores"]
  )
