"""The one error type of the data code.

Every place that reads data (prepared corpora, downstream files, source
files being prepared, images, tokenizers, data settings) raises `DataError`
when it cannot: the message is one line, ready for `eve_jax: error: ...`.
"""

from __future__ import annotations


class DataError(ValueError):
  """Data that cannot be read or a data setting that cannot work.

  Attributes:
    path: the file (or image, or directory) at fault, where there is one.
  """

  def __init__(self, message: str, path: str | None = None):
    text = f"{path}: {message}" if path else message
    # One line whatever the data held: a caller may print it as is.
    super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))
    self.path = path

  @classmethod
  def at(cls, path: str, message: str) -> "DataError":
    """`<path>: <message>`: a malformed or missing file."""
    return cls(message, path=path)


def not_in_a_bucket(flag: str, path: str, reason: str) -> DataError:
  """The error for a `gs://` data path the data code cannot read, with the
  alternative: a read-only gcsfuse mount (safe for reading)."""
  bucket, _, rest = path[len("gs://") :].partition("/")
  return DataError(
      f"{flag}={path}: {reason}; mount the bucket read-only on every host, "
      f"`gcsfuse -o ro --implicit-dirs {bucket} /mnt/{bucket}`, and pass "
      f"{flag}=/mnt/{bucket}/{rest}"
  )
