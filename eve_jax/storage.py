"""Where a run's files live: a local directory or a Cloud Storage bucket.

Every path a run reads or writes (the workdir and what is in it,
`init_from`, `data.dir`, tokenizers) is a string that is either a local
path or `gs://bucket/prefix`; the helpers here take both and go through
etils `epath` (what orbax itself uses; gcsfs underneath for `gs://`, with
the default Google credentials: the metadata server on a TPU VM,
`GOOGLE_APPLICATION_CREDENTIALS`, or `gcloud auth application-default
login`). Local paths keep exactly what the code did before: a temporary
file and a rename for atomic writes, `os.makedirs` for directories.

A bucket has no directories and no rename: an object appears whole when its
upload completes (so a single write is atomic without a temporary object),
"directories" are prefixes, and a rename is a copy and a delete (never used
for commits: orbax commits a GCS checkpoint with a `commit_success.txt`
marker instead, see eve_jax/checkpoint.py).

`check_dir` asks the server once, before anything is compiled or written,
whether the bucket can be listed, and turns what goes wrong (no such
bucket, no credentials, no permission, no server) into a `StorageError`:
one line naming the path, for `eve_jax: error: ...`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

import fsspec.config
from etils import epath

GCS = "gs://"

# gcsfs caches directory listings forever by default, so that what another
# process (another host of the run, a finished earlier run) wrote stays
# invisible: a committed checkpoint "not found", the tokenizer process 0
# wrote missing. Listings here are few and small; read them fresh. Set
# before epath makes its gcsfs instance (fsspec applies its config then).
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
# The one request `check_dir` makes: connect / read timeouts in seconds.
_PROBE_TIMEOUT_S = (10, 30)


class StorageError(ValueError):
  """A path that cannot be read or written; the message is one line."""


def is_gcs(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(GCS)


def absolute(path: str) -> str:
  """A local path made absolute (and ~ expanded); a `gs://` path as is."""
  if is_gcs(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  """os.path.join, which is also right for `gs://` strings (POSIX)."""
  return os.path.join(path, *parts)


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(p)


def exists(p: str) -> bool:
  with errors(p):
    return path(p).exists()


def isfile(p: str) -> bool:
  with errors(p):
    q = path(p)
    return q.exists() and not q.is_dir()


def isdir(p: str) -> bool:
  with errors(p):
    return path(p).is_dir()


def listdir(p: str) -> list[str]:
  """The names in directory `p` (on GCS: under the prefix `p/`)."""
  with errors(p):
    return sorted(x.name for x in path(p).iterdir())


def makedirs(p: str) -> None:
  """os.makedirs(exist_ok=True); nothing on GCS, which has no directories
  (a prefix exists once an object is under it)."""
  if is_gcs(p):
    return
  os.makedirs(p, exist_ok=True)


def read_bytes(p: str) -> bytes:
  if not is_gcs(p):  # the input pipeline's path: plain open(), its errors
    with open(p, "rb") as f:
      return f.read()
  with errors(p):
    return path(p).read_bytes()


def read_text(p: str) -> str:
  with errors(p):
    return path(p).read_text()


def write_bytes(p: str, data: bytes) -> None:
  """Writes `p` atomically: a reader sees the old content or the new, never
  a part. Locally through a temporary file in the same directory and a
  rename; on GCS an upload, which is atomic by itself."""
  if is_gcs(p):
    with errors(p):
      path(p).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  # open(), not NamedTemporaryFile: the file gets the umask's permissions,
  # as every local file eve_jax wrote before.
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


def write_text(p: str, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(p, text.encode("utf-8"))


def replace(src: str, dst: str) -> None:
  """os.replace; on GCS a copy and a delete (not atomic: not for commits)."""
  if not is_gcs(src) and not is_gcs(dst):
    os.replace(src, dst)
    return
  with errors(src):
    path(src).replace(dst)


def remove(p: str) -> None:
  with errors(p):
    path(p).unlink()


def append(p: str, data: bytes) -> None:
  """Adds `data` at the end of the object `p` without reading or
  rewriting it: the bytes go up as a part object next to it, a server-side
  compose makes [p, part] the new `p` (atomic: a reader sees the old
  object or the whole new one), and the part is deleted. Three requests
  whatever the size of `p`. A part left by a process killed between the
  steps starts with `.`, ends in `.part`, and is removed by
  `remove_parts`."""
  name = os.path.basename(p)
  part = join(os.path.dirname(p), f".{name}.{uuid.uuid4().hex}.part")
  with errors(p):
    fs = _gcsfs()
    if not fs.exists(p):
      path(p).write_bytes(data)
      return
    path(part).write_bytes(data)
    fs.merge(p, [p, part])
    fs.rm_file(part)


def remove_parts(p: str) -> list[str]:
  """Deletes the part objects an interrupted `append` to `p` left (their
  bytes never reached `p`, or already did); returns their names."""
  name = os.path.basename(p)
  directory = os.path.dirname(p)
  with errors(p):
    fs = _gcsfs()
    left = [
        q
        for q in (
            fs.ls(directory, detail=False) if fs.exists(directory) else []
        )
        if os.path.basename(q).startswith(f".{name}.") and q.endswith(".part")
    ]
    for q in left:
      fs.rm_file(q)
  return left


def _gcsfs():
  """The gcsfs file system epath uses for `gs://`."""
  return path(GCS + "x")._backend.fs(GCS + "x")  # pylint: disable=protected-access


def upload(local: str, p: str) -> None:
  """Copies the local file `local` to `p` (any kind of path)."""
  with open(local, "rb") as f:
    write_bytes(p, f.read())


def bucket(p: str) -> tuple[str, str]:
  """('bucket', 'prefix/inside') of a `gs://` path."""
  rest = os.fspath(p)[len(GCS) :]
  name, _, prefix = rest.partition("/")
  return name, prefix.strip("/")


def check_dir(p: str, what: str) -> None:
  """Fails in one line, before anything is written, when `p` (a run
  directory or a directory to read) cannot be used.

  Locally: `p` is an existing file. On GCS: the bucket cannot be listed
  (no such bucket, no credentials, no permission, the server cannot be
  reached); one list request with a timeout and no retries, so that a
  wrong address fails in seconds rather than after gcsfs's retries.

  Args:
    p: the path.
    what: how the user named it, e.g. "--workdir" or "config.init_from".
  """
  if not is_gcs(p):
    if os.path.exists(p) and not os.path.isdir(p):
      raise StorageError(f"{what} {p} is a file, not a directory")
    return
  name, prefix = bucket(p)
  if not name:
    raise StorageError(f"{what} {p} names no bucket (gs://BUCKET/PATH)")
  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions
  import requests
  from google.api_core import exceptions as api

  # pylint: enable=g-import-not-at-top
  try:
    client = _client()
    blobs = client.list_blobs(
        name,
        prefix=prefix + "/" if prefix else None,
        max_results=1,
        timeout=_PROBE_TIMEOUT_S,
        retry=None,
    )
    list(blobs)
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise StorageError(
        f"{what} {p}: no Google credentials ({_first_line(e)[:160]}); on a "
        "TPU VM the metadata server provides them, elsewhere set "
        "GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth "
        "application-default login`"
    ) from None
  except api.NotFound:
    raise StorageError(
        f"{what} {p}: the bucket gs://{name} does not exist"
    ) from None
  except (api.Forbidden, api.Unauthorized) as e:
    raise StorageError(
        f"{what} {p}: no permission to list gs://{name} with these "
        f"credentials ({_first_line(e)[:200]})"
    ) from None
  except (requests.exceptions.RequestException, OSError) as e:
    text = _first_line(e)
    why = "connection refused" if "refused" in text.lower() else text[:200]
    raise StorageError(
        f"{what} {p}: cannot reach Cloud Storage at {_endpoint()} ({why})"
    ) from None
  except api.GoogleAPICallError as e:
    raise StorageError(f"{what} {p}: {_first_line(e)[:300]}") from None


def _client():
  """A google-cloud-storage client: the emulator's when
  STORAGE_EMULATOR_HOST is set (which the client honours by itself, with
  anonymous credentials), else the default credentials' project."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return storage.Client.create_anonymous_client()
  return storage.Client()


def _endpoint() -> str:
  return os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"


def _first_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


@contextlib.contextmanager
def errors(p: str) -> Iterator[None]:
  """Turns a GCS client's failures on `p` into a one-line `StorageError`;
  local paths' errors (FileNotFoundError, ...) pass unchanged, as before."""
  if not is_gcs(p):
    yield
    return
  try:
    yield
  except FileNotFoundError:
    raise
  except (OSError, RuntimeError) as e:
    raise StorageError(f"{p}: {_first_line(e)[:300]}") from None
