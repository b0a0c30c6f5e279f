"""Tests of `python -m eve_jax.data.prepare`: every source format end to end.

Small corpora are written in each format from real photos bundled with
scikit-image (the "test" extra: PNG, JPEG and GIF files), EVE-Shapes renders
saved as PNG / JPEG / WEBP, one truncated JPEG and captions written here
(one of them blank), converted with the command line, and read back through
`records` and tfds.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from eve_jax.data import prepare, prepare_sink, records, shapes

skimage_data = pytest.importorskip("skimage.data")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKEN = "broken.jpg"
# Every corpus below is built from this catalog: photo file -> captions.
# Expected drops, whatever the format: broken.jpg (undecodable), the blank
# caption of cat.png and the only, blank, caption of shapes3.png (so that
# image has no caption left).
CATALOG_TEXT = [
    (
        "cat.png",
        [
            "a ginger cat  looking\tat the camera\n",
            "   ",
            "a tabby cat on a sofa",
        ],
    ),
    ("coins.png", ["old coins on a dark cloth"]),
    (
        "rocket.jpg",
        ["a rocket on its launch pad", "a launch tower next to a rocket"],
    ),
    ("hubble.jpg", ["faint galaxies in deep space, déjà vu"]),
    ("dancer.gif", ["a tiny animated dancer"]),
    ("cat.webp", ["the same cat saved as webp"]),
    ("shapes0.png", None),  # None: the EVE-Shapes caption of the render
    ("shapes1.jpg", None),
    ("shapes2.webp", None),
    ("shapes3.png", [" \t "]),
    (BROKEN, ["a photo cut in half"]),
]
COMMON_SKIPS = {
    "undecodable image": 1,
    "empty caption": 2,
    "image without caption": 1,
}


def clean(text: str) -> str:
  return " ".join(text.split())


def expected_pairs(entries) -> collections.Counter:
  """(image_id, cleaned caption) multiset of [(image_id, file, captions)]."""
  out = collections.Counter()
  for image_id, name, captions in entries:
    if name != BROKEN:
      out.update((image_id, clean(c)) for c in captions if c.strip())
  return out


def run(argv) -> tuple[int, str, str]:
  """prepare.main in-process: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = prepare.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def read_all(directory, split="train") -> list[dict]:
  corpus = records.CorpusSplit(directory, split)
  return [corpus[r] for r in range(len(corpus))]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """(folder of the catalog's image files, [(file, captions)])."""
  folder = tmp_path_factory.mktemp("photos")
  bundled = os.path.dirname(skimage_data.__file__)
  for mine, theirs in [
      ("cat.png", "chelsea.png"),
      ("coins.png", "coins.png"),
      ("rocket.jpg", "rocket.jpg"),
      ("hubble.jpg", "hubble_deep_field.jpg"),
      ("dancer.gif", "no_time_for_that_tiny.gif"),
  ]:
    shutil.copy(os.path.join(bundled, theirs), folder / mine)
  Image.open(folder / "cat.png").save(folder / "cat.webp", quality=90)
  rocket = (folder / "rocket.jpg").read_bytes()
  (folder / BROKEN).write_bytes(rocket[: len(rocket) // 2])
  with pytest.raises(OSError):  # really broken for Pillow
    Image.open(folder / BROKEN).convert("RGB")
  catalog = []
  for name, captions in CATALOG_TEXT:
    if name.startswith("shapes"):
      example = shapes.generate(seed=0, index=int(name[6]), image_size=64)
      Image.fromarray(example.image).save(folder / name)
      if captions is None:
        captions = [example.caption, "shapes on a dark canvas"]
    catalog.append((name, captions))
  return folder, catalog


# ---------------------------------------------------------------------------
# One corpus per format, converted once per module.


@pytest.fixture(scope="module")
def coco(photos, tmp_path_factory):
  """COCO: two captions files, two image folders, a Karpathy split."""
  src, catalog = photos
  root = tmp_path_factory.mktemp("coco")
  folders = [root / "train2014", root / "val2014"]
  for f in folders:
    f.mkdir()
  entries, files = [], [dict(images=[], annotations=[]) for _ in range(2)]
  for i, (name, captions) in enumerate(catalog):
    image_id = 100 - 7 * i  # not in catalog order: output is by id
    file_name = f"COCO_{image_id:012d}_{name}"
    shutil.copy(src / name, folders[i % 2] / file_name)
    part = files[i % 2]
    part["images"].append(dict(id=image_id, file_name=file_name, width=1))
    part["annotations"].extend(
        dict(id=1000 * i + k, image_id=image_id, caption=c)
        for k, c in enumerate(captions)
    )
    entries.append((str(image_id), name, captions))
  # An image whose file is in neither folder.
  files[0]["images"].append(dict(id=7, file_name="COCO_gone.jpg"))
  files[0]["annotations"].append(dict(id=1, image_id=7, caption="lost"))
  paths = []
  for k, content in enumerate(files):
    paths.append(root / f"captions_{k}.json")
    paths[-1].write_text(json.dumps(content))
  held = {int(entries[3][0]): "val", int(entries[7][0]): "test"}
  karpathy = dict(
      images=[
          dict(
              filename="x.jpg",
              cocoid=int(image_id),
              split=held.get(int(image_id), "restval" if k % 2 else "train"),
          )
          for k, (image_id, _, _) in enumerate(entries)
      ]
      + [dict(filename="y.jpg", cocoid=123456, split="test")]
  )
  (root / "dataset_coco.json").write_text(json.dumps(karpathy))
  out = root / "out"
  code, stdout, stderr = run(
      [
          "coco",
          "--out",
          out,
          "--captions",
          *paths,
          "--images",
          *folders,
          "--exclude_karpathy_test",
          root / "dataset_coco.json",
          "--records_per_shard",
          3,
          "--workers",
          2,
      ]
  )
  assert code == 0, stderr
  kept = [e for e in entries if int(e[0]) not in held]
  return dict(
      out=str(out),
      stdout=stdout,
      src=src,
      pairs=expected_pairs(kept),
      ids={e[0]: e[1] for e in kept},
      skipped=dict(
          COMMON_SKIPS,
          **{"missing image": 1, "karpathy val": 1, "karpathy test": 1},
      ),
  )


@pytest.fixture(scope="module")
def vg(photos, tmp_path_factory):
  """Visual Genome: region phrases, {id}.jpg in VG_100K and VG_100K_2."""
  src, catalog = photos
  root = tmp_path_factory.mktemp("vg")
  folders = [root / "VG_100K", root / "VG_100K_2"]
  for f in folders:
    f.mkdir()
  regions, entries = [], []
  for i, (name, captions) in enumerate(catalog):
    image_id = 2000 + i
    # VG names every image .jpg: the format is found from the bytes.
    shutil.copy(src / name, folders[i % 2] / f"{image_id}.jpg")
    regions.append(
        dict(
            id=image_id,
            regions=[
                dict(
                    region_id=k,
                    image_id=image_id,
                    phrase=c,
                    x=0,
                    y=0,
                    width=5,
                    height=5,
                )
                for k, c in enumerate(captions)
            ],
        )
    )
    entries.append((str(image_id), name, captions))
  regions.append(dict(id=1, regions=[dict(phrase="no file for me")]))
  (root / "region_descriptions.json").write_text(json.dumps(regions[::-1]))
  out = root / "out"
  code, _, stderr = run(
      [
          "vg",
          "--out",
          out,
          "--regions",
          root / "region_descriptions.json",
          "--images",
          *folders,
      ]
  )
  assert code == 0, stderr
  return dict(
      out=str(out),
      pairs=expected_pairs(entries),
      skipped=dict(COMMON_SKIPS, **{"missing image": 1}),
  )


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(src, catalog, folder) -> list[tuple[str, str, list[str]]]:
  """img2dataset-style shards 00000.tar, 00001.tar; returns the entries."""
  entries = []
  for shard in range(2):
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
      for i, (name, captions) in enumerate(catalog):
        if i % 2 != shard:
          continue
        key = f"{shard:05d}{i:04d}"
        ext = name.rsplit(".", 1)[1]
        # The gif goes in as .jpg, as a crawler would name it.
        _add(
            tar,
            f"{key}.{'jpg' if ext == 'gif' else ext}",
            (src / name).read_bytes(),
        )
        meta = dict(key=key, caption=captions[0], status="success")
        if i % 3 != 1:  # else only KEY.json holds the caption
          _add(tar, f"{key}.txt", captions[0].encode())
          meta["caption"] = "the .txt wins over this"
        _add(tar, f"{key}.json", json.dumps(meta).encode())
        entries.append((key, name, captions[:1]))
      if shard == 1:  # a caption whose image failed to download
        _add(tar, "000019999.txt", b"an image that never came")
  return entries


@pytest.fixture(scope="module")
def webdataset(photos, tmp_path_factory):
  src, catalog = photos
  root = tmp_path_factory.mktemp("wds")
  entries = write_shards(src, catalog, root)
  out = root / "out"
  code, _, stderr = run(
      [
          "webdataset",
          "--out",
          out,
          "--name",
          "cc3m",
          "--shards",
          root / "*.tar",
          "--workers",
          3,
      ]
  )
  assert code == 0, stderr
  skipped = dict(COMMON_SKIPS, **{"sample without image": 1})
  skipped["empty caption"] = 1  # one caption per sample: cat's blank is 2nd
  return dict(
      out=str(out), pairs=expected_pairs(entries), skipped=skipped, root=root
  )


def write_table(src, catalog, root) -> tuple[list[tuple[str, str]], list]:
  """(image, caption) rows, one per caption, relative and absolute paths."""
  (root / "imgs").mkdir()
  rows, entries = [], []
  for i, (name, captions) in enumerate(catalog):
    shutil.copy(src / name, root / "imgs" / name)
    image = f"imgs/{name}" if i % 4 else str(root / "imgs" / name)
    rows.extend((image, c) for c in captions)
    entries.append((image, name, captions))
  rows.append(("imgs/not_there.png", "a missing photo"))
  # Rows of one image need not be adjacent: move cat's last row to the end.
  rows.append(rows.pop(2))
  return rows, entries


@pytest.fixture(scope="module")
def tsv(photos, tmp_path_factory):
  src, catalog = photos
  root = tmp_path_factory.mktemp("tsv")
  rows, entries = write_table(src, catalog, root)
  lines = ["image\tcaption"] + [
      f"{i}\t{c.replace(chr(10), ' ')}" for i, c in rows
  ]
  (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
  out = root / "out"
  code, _, stderr = run(
      ["tsv", "--out", out, "--file", root / "pairs.tsv", "--images", root]
  )
  assert code == 0, stderr
  return dict(
      out=str(out),
      pairs=expected_pairs(entries),
      root=root,
      skipped=dict(COMMON_SKIPS, **{"missing image": 1}),
  )


# ---------------------------------------------------------------------------
# Contents.


@pytest.mark.parametrize("corpus", ["coco", "vg", "webdataset", "tsv"])
def test_pairs_and_skips(corpus, request):
  c = request.getfixturevalue(corpus)
  got = collections.Counter(records.all_pairs(c["out"]))
  assert got == c["pairs"]
  assert max(got.values()) == 1  # every valid pair exactly once
  summary = records.read_summary(c["out"])
  assert summary["skipped"] == c["skipped"]
  assert summary["images"] == len({i for i, _ in c["pairs"]})
  assert summary["pairs"] == sum(c["pairs"].values())
  assert summary["splits"] == {
      "train": {"records": summary["images"], "pairs": summary["pairs"]}
  }
  # Every image that is not JPEG or PNG (gif, webp) was re-encoded.
  assert summary["reencoded_as_jpeg"] == 3


def test_coco_karpathy_order_and_summary_line(coco):
  assert coco["pairs"][("100", "a ginger cat looking at the camera")] == 1
  ids = [r["image_id"] for r in read_all(coco["out"])]
  assert ids == sorted(ids, key=int)  # image-id order
  assert len(ids) == 7 and set(ids) == {i for i, _ in coco["pairs"]}
  assert {"79", "51"}.isdisjoint(ids)  # Karpathy val and test
  assert len(glob.glob(os.path.join(coco["out"], "*.array_record-*"))) == 3
  line = coco["stdout"].strip()
  assert line.startswith(
      f"prepared coco: 7 images, 11 pairs -> {coco['out']}" " (skipped: "
  )
  for reason, n in coco["skipped"].items():
    assert f"{n} {reason}" in line


def test_image_bytes(coco, photos):
  src, _ = photos
  by_file = {coco["ids"][r["image_id"]]: r for r in read_all(coco["out"])}
  for name in ["cat.png", "coins.png", "shapes0.png", "rocket.jpg"]:
    stored = by_file[name]["image"]
    assert stored == (src / name).read_bytes()  # as found
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(stored))),
        np.asarray(Image.open(src / name)),
    )
  np.testing.assert_array_equal(  # the render itself survives
      np.asarray(Image.open(io.BytesIO(by_file["shapes0.png"]["image"]))),
      shapes.generate(seed=0, index=0, image_size=64).image,
  )
  for name in ["cat.webp", "dancer.gif"]:
    image = Image.open(io.BytesIO(by_file[name]["image"]))
    assert (image.format, image.mode) == ("JPEG", "RGB")
    source = Image.open(src / name).convert("RGB")
    assert image.size == source.size
    if name == "cat.webp":  # quality 95: close to the source pixels
      diff = np.abs(np.asarray(image, np.float32) - np.asarray(source))
      assert diff.mean() < 2.0
  assert all(r["source"] == "coco" for r in by_file.values())


def test_webdataset_details(webdataset):
  rows = read_all(webdataset["out"])
  assert {r["source"] for r in rows} == {"cc3m"}
  assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
  assert all(
      c != "the .txt wins over this" for r in rows for c in r["captions"]
  )


def test_tfds_reads_without_tensorflow(coco):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.builder_from_directory(coco["out"]).as_data_source("train")
  assert len(source) == 7
  first = source[0]
  assert set(first) == {"image", "captions", "image_id", "source"}
  Image.open(io.BytesIO(first["image"])).convert("RGB")
  assert "tensorflow" not in sys.modules


def test_parquet(photos, tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  src, catalog = photos
  rows, entries = write_table(src, catalog, tmp_path)
  images, captions = zip(*rows)
  pq.write_table(
      pa.table(
          dict(
              image=list(images),
              caption=list(captions),
              extra=list(range(len(rows))),
          )
      ),
      tmp_path / "pairs.parquet",
      row_group_size=5,
  )
  code, _, err = run(
      [
          "tsv",
          "--out",
          tmp_path / "out",
          "--file",
          tmp_path / "pairs.parquet",
          "--name",
          "pq",
      ]
  )
  assert code == 0, err
  got = collections.Counter(records.all_pairs(str(tmp_path / "out")))
  assert got == expected_pairs(entries)
  assert records.read_summary(str(tmp_path / "out"))["skipped"] == dict(
      COMMON_SKIPS, **{"missing image": 1}
  )


def test_eval_split_limit_and_determinism(tsv, tmp_path):
  args = [
      "tsv",
      "--file",
      tsv["root"] / "pairs.tsv",
      "--eval_images",
      3,
      "--records_per_shard",
      2,
  ]
  for run_dir in ["a", "b"]:
    code, out, err = run(
        [
            *args,
            "--out",
            tmp_path / run_dir,
            "--workers",
            1 if run_dir == "a" else 4,
        ]
    )
    assert code == 0, err
  assert "(3 of them in eval)" in out
  train = {r["image_id"] for r in read_all(tmp_path / "a")}
  held = [r["image_id"] for r in read_all(tmp_path / "a", "eval")]
  everything = {i for i, _ in tsv["pairs"]}
  assert len(held) == 3 and train.isdisjoint(held)
  assert train | set(held) == everything
  # The held-out images are those with the smallest hash of their id.
  assert set(held) == set(sorted(everything, key=prepare_sink.eval_key)[:3])
  assert read_all(tmp_path / "a", "eval")[0]["captions"]  # whole records
  shards = sorted(os.listdir(tmp_path / "a"))
  assert shards == sorted(os.listdir(tmp_path / "b"))
  for name in shards:
    assert (tmp_path / "a" / name).read_bytes() == (
        tmp_path / "b" / name
    ).read_bytes(), name
  code, _, _ = run(
      [
          "tsv",
          "--file",
          tsv["root"] / "pairs.tsv",
          "--limit",
          2,
          "--out",
          tmp_path / "c",
      ]
  )
  assert code == 0
  assert len(read_all(tmp_path / "c")) == 2


# ---------------------------------------------------------------------------
# The tokenizer.


def test_tokenizer_over_two_corpora(coco, webdataset, tmp_path):
  from eve_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  model = tmp_path / "spm.model"
  code, out, err = run(
      [
          "tokenizer",
          "--out",
          model,
          coco["out"],
          webdataset["out"],
          "--vocab_size",
          120,
      ]
  )
  assert code == 0, err
  assert out.startswith("tokenizer: ") and str(model) in out
  tokenizer = Tokenizer(str(model))
  assert f"{tokenizer.vocab_size:,} pieces" in out
  words = {
      w
      for c in [coco, webdataset]
      for _, caption in c["pairs"]
      for w in caption.split()
  }
  assert "déjà" in words
  for word in sorted(words):
    assert tokenizer.unk_id not in tokenizer.encode(word), word


def test_sample_captions_spreads_over_corpora(tmp_path):
  for name, images, per_image in [("alpha", 10, 2), ("beta", 30, 1)]:
    with records.CorpusWriter(str(tmp_path / name), name) as writer:
      for i in range(images):
        writer.add(
            b"x", [f"{name} {i} {k}" for k in range(per_image)], str(i), name
        )
  dirs = [str(tmp_path / "alpha"), str(tmp_path / "beta")]
  texts = prepare.sample_captions(dirs, 8)
  assert texts == prepare.sample_captions(dirs, 8)
  # Shares 20/50 and 30/50 of 8, at evenly spaced pairs.
  assert texts == [
      "alpha 0 0",
      "alpha 3 0",
      "alpha 6 1",
      "beta 0 0",
      "beta 6 0",
      "beta 12 0",
      "beta 18 0",
      "beta 24 0",
  ]
  assert len(prepare.sample_captions(dirs, 1000)) == 50
  assert prepare.corpus_dirs([str(tmp_path)]) == dirs  # a folder of corpora


# ---------------------------------------------------------------------------
# Malformed inputs: one line, exit status 1, no corpus.


def _cli(*argv) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, "-m", "eve_jax.data.prepare", *map(str, argv)],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=60,
  )


def assert_one_line_error(code, stderr, names, out):
  lines = stderr.strip().splitlines()
  assert code == 1 and len(lines) == 1, stderr
  assert lines[0].startswith("eve_jax: error: "), stderr
  assert names in lines[0], stderr
  assert not os.path.exists(os.path.join(out, "dataset_info.json"))
  assert not glob.glob(os.path.join(out, ".*part*"))


def test_cli_errors(photos, tmp_path):
  src, _ = photos
  bad = tmp_path / "captions_bad.json"
  bad.write_text(
      json.dumps(
          dict(
              images=[dict(id=1, file_name="rocket.jpg")],
              annotations=[dict(image_id=1, caption="ok"), dict(image_id=1)],
          )
      )
  )
  p = _cli("coco", "--out", tmp_path / "o1", "--captions", bad, "--images", src)
  assert_one_line_error(
      p.returncode,
      p.stderr,
      "captions_bad.json: " "annotations[1] has no field 'caption'",
      tmp_path / "o1",
  )
  (tmp_path / "fake.tar").write_text("this is not a tar archive\n" * 40)
  p = _cli(
      "webdataset", "--out", tmp_path / "o2", "--shards", tmp_path / "fake.tar"
  )
  assert_one_line_error(
      p.returncode, p.stderr, "fake.tar: not a tar", tmp_path / "o2"
  )
  (tmp_path / "rows.tsv").write_text(
      f"{src}/rocket.jpg\ta rocket\n"
      f"{src}/cat.png\ta cat\n"
      f"{src}/coins.png\n"
  )
  p = _cli("tsv", "--out", tmp_path / "o3", "--file", tmp_path / "rows.tsv")
  assert_one_line_error(
      p.returncode, p.stderr, "rows.tsv: line 3: one " "column", tmp_path / "o3"
  )


def test_errors_in_process(photos, coco, webdataset, tmp_path, monkeypatch):
  src, _ = photos
  captions = os.path.join(os.path.dirname(coco["out"]), "captions_0.json")
  code, _, err = run(
      [
          "coco",
          "--out",
          tmp_path / "o",
          "--captions",
          captions,
          "--images",
          src,
          tmp_path / "nowhere",
      ]
  )
  assert_one_line_error(
      code, err, "nowhere: no such image folder", tmp_path / "o"
  )
  code, _, err = run(
      ["coco", "--out", coco["out"], "--captions", captions, "--images", src]
  )
  assert_one_line_error(
      code, err, "already holds a prepared corpus", tmp_path / "o"
  )
  # A shard cut short: records were written before the error; none stay.
  tars = sorted(glob.glob(str(webdataset["root"] / "*.tar")))
  shutil.copy(tars[0], tmp_path / "a.tar")
  data = open(tars[1], "rb").read()
  (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
  code, _, err = run(
      [
          "webdataset",
          "--out",
          tmp_path / "o",
          "--shards",
          tmp_path / "a.tar",
          tmp_path / "b.tar",
          "--records_per_shard",
          1,
      ]
  )
  assert_one_line_error(code, err, "b.tar: unreadable tar", tmp_path / "o")
  assert not os.path.exists(tmp_path / "o")  # created by the run, removed
  (tmp_path / "t.parquet").write_bytes(b"PAR1")
  with monkeypatch.context() as m:  # as if pyarrow were not installed
    m.setitem(sys.modules, "pyarrow", None)
    m.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(
        ["tsv", "--out", tmp_path / "o", "--file", tmp_path / "t.parquet"]
    )
  assert_one_line_error(
      code, err, "t.parquet: reading .parquet needs " "pyarrow", tmp_path / "o"
  )
