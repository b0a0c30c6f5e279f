"""Runs in a Cloud Storage bucket: a real GCS-compatible server on
127.0.0.1 (tests/gcs_server.py), no mocked file system.

Fast: paths, metrics.jsonl appends, config.json, the checkpoint commit
marker, unusable workdirs as one line with nothing in the bucket changed.
Slow: a tiny run in a bucket resumed bitwise as a local run, predict and
fine-tuning from it, kill -9 in the middle of a checkpoint write, two
processes sharing one bucket workdir.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eve_jax import config_lib, run_config, storage, trainer, watchdog
from eve_jax.checkpoint import Checkpointer
from eve_jax.writers import MetricWriter
from gcs_server import Server
from test_train import micro_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "eve-test"


@pytest.fixture(scope="module")
def gcs():
  server = Server()
  server.make_bucket(BUCKET)
  yield server
  server.stop()


@pytest.fixture
def on_gcs(gcs, monkeypatch):
  """This process's clients pointed at the server."""
  for k, v in gcs.env.items():
    monkeypatch.setenv(k, v)
  return gcs


def _names(gcs, prefix):
  return sorted(gcs.objects(BUCKET, prefix))


# -- fast ------------------------------------------------------------------


def test_paths_on_a_bucket(on_gcs):
  run = f"gs://{BUCKET}/paths/run"
  assert not storage.exists(run) and not storage.isdir(run)
  storage.write_text(f"{run}/config.json", '{"a": 1}')
  assert storage.isfile(f"{run}/config.json")
  assert storage.isdir(run) and not storage.isfile(run)
  assert storage.listdir(run) == ["config.json"]
  assert json.loads(storage.read_text(f"{run}/config.json")) == {"a": 1}
  storage.replace(f"{run}/config.json", f"{run}/config.step3.json")
  assert storage.listdir(run) == ["config.step3.json"]
  storage.makedirs(f"{run}/viz")  # no directories in a bucket: nothing made
  assert _names(on_gcs, "paths/") == ["paths/run/config.step3.json"]
  # A viz picture: PNG bytes in one upload.
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top

  from eve_jax.viz import images as vimg  # pylint: disable=g-import-not-at-top

  pic = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  vimg.save_png(f"{run}/viz/step1.png", pic)
  png = storage.read_bytes(f"{run}/viz/step1.png")
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), pic)
  storage.remove(f"{run}/viz/step1.png")
  assert storage.absolute("gs://b/run/") == "gs://b/run"
  assert storage.absolute("rel") == os.path.abspath("rel")


def test_viz_samples_to_a_bucket_read_back_as_predict_inputs(on_gcs, tmp_path):
  """`viz samples --out gs://...` writes the same PNGs and captions.txt as
  to a local folder, and the image inputs of predict / viz (`--image`,
  `--images`) read them from the bucket."""
  from eve_jax import inference  # pylint: disable=g-import-not-at-top
  from eve_jax.viz.__main__ import run as viz  # pylint: disable=g-import-not-at-top

  out = f"gs://{BUCKET}/samples"
  for where in (out, str(tmp_path)):
    viz(["samples", "--out", where, "--num", "2", "--size", "32"])
  names = ["captions.txt", "shapes_000.png", "shapes_001.png"]
  assert storage.listdir(out) == names
  for n in names:
    assert storage.read_bytes(f"{out}/{n}") == (tmp_path / n).read_bytes()
  found = inference.list_images(out)
  assert found == [f"{out}/shapes_000.png", f"{out}/shapes_001.png"]
  np.testing.assert_array_equal(
      inference.read_image(found[1], 32),
      inference.read_image(str(tmp_path / "shapes_001.png"), 32),
  )
  with pytest.raises(inference.InputError, match="no such file"):
    inference.check_file(f"{out}/shapes_002.png")


def _rows(n, start=1):
  return [
      (s, {"loss": 1.0 / s, "lr": 0.5, "samples_per_s": 3.25})
      for s in range(start, start + n)
  ]


def test_metrics_rows_are_a_local_runs_and_go_up_in_batches(on_gcs, tmp_path):
  """The same bytes as a local run's metrics.jsonl, eval.jsonl and
  eval.json; rows reach the bucket at `flush` (which the loop calls before
  each checkpoint), not one request per row; a part object a killed
  append left is removed."""
  wd = f"gs://{BUCKET}/metrics/run"
  storage.write_text(f"{wd}/.metrics.jsonl.dead.part", '{"step": 0}\n')
  local, remote = MetricWriter(str(tmp_path)), MetricWriter(wd, flush_s=3600)
  assert not storage.exists(f"{wd}/.metrics.jsonl.dead.part")
  for s, m in _rows(3):
    local.write(s, m)
    remote.write(s, m)
  assert not storage.exists(f"{wd}/metrics.jsonl")  # still in memory
  remote.flush()
  text = (tmp_path / "metrics.jsonl").read_text()
  assert storage.read_text(f"{wd}/metrics.jsonl") == text
  for s, m in _rows(4, start=4):
    local.write(s, m)
    remote.write(s, m)
  for w in (local, remote):
    w.write_eval(7, {"mlm_acc": 0.5})
    w.close()
  for name in ("metrics.jsonl", "eval.jsonl", "eval.json"):
    assert storage.read_text(f"{wd}/{name}") == (tmp_path / name).read_text()
  assert len(storage.read_text(f"{wd}/metrics.jsonl").splitlines()) == 7
  # TensorBoard: one events object per flush that had events.
  events = storage.listdir(f"{wd}/tensorboard")
  assert len(events) == 2 and all("tfevents" in e for e in events)
  assert all(not n.endswith(".part") for n in _names(on_gcs, "metrics/"))
  # flush_s=0: every row goes up at once.
  w = MetricWriter(f"gs://{BUCKET}/metrics/eager", flush_s=0)
  w.write(1, {"loss": 1.0})
  assert storage.read_text(f"gs://{BUCKET}/metrics/eager/metrics.jsonl")
  w.close()


def test_config_json_in_a_bucket(on_gcs):
  wd = f"gs://{BUCKET}/config/run"
  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  run_config.write(c, wd, None, [])
  assert run_config.check(c, wd, 5) == []
  other = c.copy_and_resolve_references()
  other.seed = c.seed + 1
  with pytest.raises(run_config.ConfigChangeError, match="seed: 0 -> 1"):
    run_config.check(other, wd, 5)
  other.train.allow_config_change = True
  changed = run_config.check(other, wd, 5)
  run_config.write(other, wd, 5, changed)
  assert storage.listdir(wd) == ["config.json", "config.step5.json"]
  storage.write_text(f"{wd}/config.json", '{"model": ')
  with pytest.raises(run_config.ConfigChangeError) as e:
    run_config.check(c, wd, 5)
  assert f"cannot read {wd}/config.json" in str(e.value)
  assert "\n" not in str(e.value)


def test_checkpoints_commit_with_a_marker_in_a_bucket(on_gcs):
  """orbax's GCS commit: no rename, a `commit_success.txt` object per step;
  a step without it is not listed by orbax nor by the watchdog's note."""
  wd = f"gs://{BUCKET}/ckpt/run"
  state = {"params": {"w": jnp.arange(6.0), "b": jnp.ones((2, 3))}}
  ckpt = Checkpointer(wd, every=1, keep=5)
  for step in (1, 2):
    ckpt.save(step, jax.tree.map(lambda x: x * step, state), {"i": step})
  ckpt.close()
  names = _names(on_gcs, "ckpt/run/checkpoints/")
  assert "ckpt/run/checkpoints/2/commit_success.txt" in names
  assert not any("orbax-checkpoint-tmp" in n for n in names)
  assert watchdog.committed_steps(wd) == [1, 2]
  # Step 2 as a process killed before the commit leaves it.
  storage.remove(f"{wd}/checkpoints/2/commit_success.txt")
  assert watchdog.committed_steps(wd) == [1]
  assert "resumes from step 1" in watchdog.resume_note(wd, 30)
  ckpt = Checkpointer(wd, every=1, keep=5)
  assert ckpt.latest_step() == 1
  got, data = ckpt.restore(1, jax.eval_shape(lambda: state))
  ckpt.close()
  assert data == {"i": 1}
  np.testing.assert_array_equal(got["params"]["w"], np.arange(6.0))


def _fake_resumable_run(wd):
  """What a run that saved step 1 left in `wd` (a tokenizer, a committed
  checkpoint), with `config.json` corrupt."""
  from eve_jax.data.tokenizer import shapes_tokenizer  # pylint: disable=g-import-not-at-top

  shapes_tokenizer(f"{wd}/tokenizer.model", vocab_size=64, num_captions=300)
  ckpt = Checkpointer(wd, every=1, keep=1)
  ckpt.save(1, {"w": jnp.zeros(3)}, {})
  ckpt.close()
  storage.write_text(f"{wd}/config.json", "{not json")


def test_unusable_bucket_workdirs_are_one_line_and_change_nothing(
    on_gcs, monkeypatch
):
  c = micro_config()
  cases = {
      f"gs://no-such-bucket/run": "the bucket gs://no-such-bucket does not exist",
      f"gs://{BUCKET}/corrupt": (
          f"cannot read gs://{BUCKET}/corrupt/config.json of the run being "
          "resumed"
      ),
  }
  _fake_resumable_run(f"gs://{BUCKET}/corrupt")
  before = on_gcs.objects(BUCKET)
  for wd, want in cases.items():
    with pytest.raises(ValueError) as e:
      trainer.run(c, wd)
    assert want in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert on_gcs.objects(BUCKET) == before
  # A server that refuses: at once, not after the client's retries.
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{1}")
  with pytest.raises(storage.StorageError, match="connection refused"):
    trainer.run(c, f"gs://{BUCKET}/run")
  # No credentials (not the emulator: the real endpoint, never reached).
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent.json")
  with pytest.raises(storage.StorageError, match="no Google credentials"):
    storage.check_dir(f"gs://{BUCKET}/run", "--workdir")


def test_data_in_a_bucket_says_to_mount_it(on_gcs, tmp_path):
  """grain's ArrayRecord source given a gs:// name hangs instead of
  failing: pretraining corpora, downstream files and `prepare --out` in a
  bucket are one line at start naming the read-only gcsfuse mount."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  from eve_jax.data import prepare, sources  # pylint: disable=g-import-not-at-top
  from eve_jax.finetune import FineTuning  # pylint: disable=g-import-not-at-top

  c = micro_config()
  c.data.dir = f"gs://{BUCKET}/corpora"
  with pytest.raises(ValueError) as e:
    sources.check_data(c, "")
  assert "gcsfuse -o ro --implicit-dirs eve-test /mnt/eve-test" in str(e.value)
  assert "--config.data.dir" not in str(e.value)
  assert "config.data.dir=/mnt/eve-test/corpora" in str(e.value)
  v = config_lib.from_file("vqa", "tiny")
  v.data.dir = f"gs://{BUCKET}/vqa_data"
  with pytest.raises(ValueError, match="read from local paths only; mount"):
    FineTuning.check(v, "")
  (tmp_path / "t.tsv").write_text("a.png\ta caption\n")
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = prepare.main(
        ["tsv", "--file", str(tmp_path / "t.tsv"), "--out", "gs://eve-test/c"]
    )
  assert code == 1 and err.getvalue().count("\n") == 1
  assert "gcloud storage cp -r DIR gs://eve-test/c" in err.getvalue()


def test_converted_weights_to_a_bucket_load_as_init_from(on_gcs):
  """`convert ... --out gs://`'s writer: the checkpoint, config.json and
  tokenizer in the bucket, read back as an init_from directory; a second
  write into it is refused."""
  from eve_jax import pretrained  # pylint: disable=g-import-not-at-top
  from eve_jax.convert import output  # pylint: disable=g-import-not-at-top
  from eve_jax.convert.source import ConversionError  # pylint: disable=g-import-not-at-top

  out = f"gs://{BUCKET}/converted"
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  output.write(out, {"backbone": {"w": w}}, {"model": {}}, {}, "{}")
  assert storage.listdir(out) == [
      "checkpoints",
      "config.json",
      "conversion_report.json",
      "tokenizer.json",
  ]
  assert pretrained.read_config(out) == {"model": {}}
  assert pretrained.tokenizer_path(out) == f"{out}/tokenizer.json"
  params, step = pretrained.load_params(out)
  assert step == 0
  np.testing.assert_array_equal(params["backbone"]["w"], w)
  with pytest.raises(ConversionError, match="already holds checkpoints"):
    output.write(out, {"w": w}, {}, {})


def _cli(args, env, timeout=600):
  env = {k: v for k, v in {**os.environ, **env}.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def test_the_cli_says_one_line_for_an_unusable_workdir(gcs, tmp_path):
  """A local --workdir that is a file (a FileExistsError traceback before)
  and a bucket that does not exist."""
  afile = tmp_path / "notes.txt"
  afile.write_text("mine")
  for wd, want in (
      (str(afile), f"--workdir {afile} is a file, not a directory"),
      ("gs://no-such-bucket/run", "gs://no-such-bucket does not exist"),
  ):
    out = _cli(
        [
            "-m",
            "eve_jax.main",
            "--config=configs/base.py:tiny",
            f"--workdir={wd}",
        ],
        gcs.env,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("eve_jax: error: ") and want in last, last
  assert afile.read_text() == "mine"


# -- slow: real runs ---------------------------------------------------------

STEPS = 60
ARGS = [
    "--config=configs/base.py:tiny",
    "--config.model.depth=2",
    "--config.model.decoder_depth=1",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=20",
    "--config.train.keep_checkpoints=10",
    "--config.train.eval_every=0",
    "--config.train.eval_examples=8",
    "--config.train.eval_batch_size=8",
    "--config.train.viz=False",
    "--config.data.num_tokenizer_captions=500",
]


@pytest.fixture(scope="module")
def cache_env(gcs, tmp_path_factory):
  """The server's variables, and one compilation cache for every run."""
  return dict(
      gcs.env,
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _train(wd, env, steps, driver=("-m", "eve_jax.main"), check=True):
  out = _cli(
      [*driver, *ARGS, f"--config.train.steps={steps}", f"--workdir={wd}"],
      env,
  )
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def _read_rows(path):
  return [json.loads(line) for line in storage.read_text(path).splitlines()]


def _params(wd, step):
  path = os.path.join(wd, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)["params"]
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def local_ref(cache_env, tmp_path_factory):
  """The local run straight to STEPS."""
  wd = str(tmp_path_factory.mktemp("ref") / "w")
  _train(wd, cache_env, STEPS)
  rows = _read_rows(f"{wd}/metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return wd, {r["step"]: r["loss"] for r in rows}


def _same_params(a, b):
  pa, pb = _params(a, STEPS), _params(b, STEPS)
  assert pa.keys() == pb.keys() and len(pa) > 50
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_a_bucket_run_resumes_bitwise_and_feeds_predict_and_finetuning(
    on_gcs, cache_env, tmp_path
):
  """40 steps in gs://, resumed to 60: the same losses and final
  parameters, bitwise, as the same two commands on a local workdir (the
  learning-rate schedule follows train.steps, so the local run is
  resumed the same way); `predict fill` reads it; a fine-tuning run
  starts from it with init_from=gs://."""
  ref, wd = str(tmp_path / "local"), f"gs://{BUCKET}/run"
  for d in (ref, wd):
    _train(d, cache_env, 40)
    assert watchdog.committed_steps(d) == [20, 40]
    _train(d, cache_env, STEPS)
  rows = _read_rows(f"{wd}/metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  ref_rows = _read_rows(f"{ref}/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [
      (r["step"], r["loss"]) for r in ref_rows
  ]
  _same_params(ref, wd)
  names = storage.listdir(wd)
  for name in ("config.json", "tokenizer.model", "run.jsonl", "tensorboard"):
    assert name in names, names

  from test_predict import _samples  # pylint: disable=g-import-not-at-top

  ((image, _),) = _samples(str(tmp_path / "img"), 1)
  out = _cli(
      [
          "-m",
          "eve_jax.predict",
          "--workdir",
          wd,
          "fill",
          "--image",
          image,
          "--text",
          "a large [MASK] circle",
      ],
      cache_env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1].startswith("filled: a large ")

  ft = f"gs://{BUCKET}/vqa"
  out = _cli(
      [
          "-m",
          "eve_jax.main",
          "--config=configs/vqa.py:tiny",
          f"--workdir={ft}",
          f"--config.init_from={wd}",
          "--config.model.depth=2",
          "--config.train.steps=4",
          "--config.train.batch_size=8",
          "--config.train.log_every=2",
          "--config.train.checkpoint_every=4",
      ],
      cache_env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(storage.read_text(f"{ft}/init_report.json"))
  assert report["init_from"] == wd and report["step"] == STEPS
  assert [r["step"] for r in _read_rows(f"{ft}/metrics.jsonl")] == [2, 4]
  assert "vqa_acc" in json.loads(storage.read_text(f"{ft}/eval.json"))
  assert watchdog.committed_steps(ft) == [4]


def test_kill_during_a_checkpoint_write_to_a_bucket(
    on_gcs, cache_env, local_ref
):
  """SIGKILL while the step-40 checkpoint is being written to the bucket
  (tests/crash_driver.py): step 40 never counts, the same command resumes
  from 20, and the end is the uninterrupted run's, bitwise."""
  ref, ref_loss = local_ref
  wd = f"gs://{BUCKET}/killed"
  out = _train(
      wd, cache_env, STEPS, driver=["tests/crash_driver.py", "40"], check=False
  )
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  names = _names(on_gcs, "killed/checkpoints/40/")
  assert "killed/checkpoints/40/commit_success.txt" not in names, names
  assert watchdog.committed_steps(wd) == [20]
  out = _train(wd, cache_env, STEPS)
  assert "resumed from" in out.stderr and "at step 20" in out.stderr
  rows = _read_rows(f"{wd}/metrics.jsonl")
  assert {r["step"] for r in rows} == set(range(1, STEPS + 1))
  for r in rows:  # rows 21-40 twice at most, each with the same loss
    assert r["loss"] == ref_loss[r["step"]], r["step"]
  assert watchdog.committed_steps(wd) == [20, 40, 60]
  _same_params(ref, wd)


@pytest.mark.slow
def test_two_processes_share_a_bucket_workdir(on_gcs, tmp_path):
  """jax.distributed on localhost, 2 processes x 2 CPU devices, one gs://
  workdir: both write their shards of the checkpoint, process 0 the
  metrics, and one process restores the parameters they ended with."""
  from test_multiprocess import OVERRIDES, STEPS as MP_STEPS, run_two_processes  # pylint: disable=g-import-not-at-top

  wd, out = f"gs://{BUCKET}/two", tmp_path / "out"
  out.mkdir()
  run_two_processes(wd, out, on_gcs.env)
  names = _names(on_gcs, "two/checkpoints/")
  for i in range(2):  # each process wrote its own shard store
    assert any(f"/ocdbt.process_{i}/" in n for n in names), names
  rows = _read_rows(f"{wd}/metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, MP_STEPS + 1))
  assert watchdog.committed_steps(wd) == [MP_STEPS]
  # A single process (here: one device) restores it, as in
  # test_multiprocess.py.
  from eve_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from eve_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  c = config_lib.get_pretrain_config("tiny", default_variant="base")
  c.train.update(OVERRIDES)
  c.mesh.data = 1
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  rules = sharding.parse_rules(c.axis_rules)
  with sharding.use(mesh, rules):
    prog = train.build_program(
        c, Tokenizer(f"{wd}/tokenizer.model"), mesh, rules
    )
    ckpt = Checkpointer(wd, every=MP_STEPS, keep=1)
    assert ckpt.latest_step() == MP_STEPS
    state, _ = ckpt.restore(MP_STEPS, prog.abstract)
    ckpt.close()
  want = np.load(out / "params.npz")
  got = {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(state.params)
  }
  assert sorted(got) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
