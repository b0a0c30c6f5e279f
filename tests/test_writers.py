"""What runs write for people: the progress line and TensorBoard images."""

import io
import os

import numpy as np

from eve_jax.writers import MetricWriter, Progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_is_one_live_line_on_a_terminal():
  out = _Terminal()
  p = Progress(100, 0, stream=out)
  p.update(10, dict(loss=1.25, mlm_acc=0.5, samples_per_s=123.4))
  p.update(20, dict(loss=1.0, mlm_acc=0.6, samples_per_s=120.0))
  p.message("eval at step 20")
  p.close()
  text = out.getvalue()
  assert "\n" not in text[:-1]  # one line rewritten in place
  assert text.count("\r") >= 3
  assert "step 20/100 loss 1.0000 mlm_acc 0.600 120.0 samples/s ETA " in text


def test_progress_writes_log_lines_off_a_terminal(caplog):
  out = io.StringIO()
  p = Progress(100, 0, stream=out)
  with caplog.at_level("INFO"):
    p.update(10, dict(loss=1.25, samples_per_s=50.0))
  assert out.getvalue() == ""
  assert "step 10/100 loss 1.2500 50.0 samples/s ETA" in caplog.text


def test_images_go_to_tensorboard(tmp_path):
  w = MetricWriter(str(tmp_path))
  w.image(3, "recon", np.zeros((8, 8, 3), np.uint8))
  w.close()
  tb = os.path.join(tmp_path, "tensorboard")
  data = b"".join(
      open(os.path.join(tb, f), "rb").read() for f in os.listdir(tb)
  )
  assert b"recon" in data and b"\x89PNG" in data
  MetricWriter(str(tmp_path / "off"), enabled=False).image(
      1, "x", np.zeros((2, 2, 3), np.uint8)
  )
  assert not os.path.exists(tmp_path / "off")
