"""Files an export writes: the path checked before the (slow) conversion, the bytes written atomically."""

from __future__ import annotations

import os
import tempfile


def check_path(fn: str, path: str, overwrite: bool, suffix: str) -> None:
  """Raises a `ValueError` naming `fn` unless a `suffix` file can be written at `path`.

  Called before converting, so a bad path fails at once, not after the conversion.
  """
  if os.path.isdir(path):
    raise ValueError(f"{fn}: `path` {path!r} is a directory; give the path of the {suffix} "
                     f"file to write.")
  if os.path.lexists(path) and not overwrite:
    raise ValueError(f"{fn}: `path` {path!r} exists; choose a new path or pass "
                     f"overwrite=True to replace it.")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".export-", suffix=suffix, dir=parent)
    os.close(fd)
    os.remove(probe)
  except OSError as err:
    raise ValueError(f"{fn}: `path` {path!r} cannot be written ({err.strerror or err}: "
                     f"{parent!r}); choose a path in a writable directory.") from None


def write(path: str, data: bytes, suffix: str) -> None:
  """`data` written next to `path` and moved into place: a failed write leaves an existing file."""
  fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=suffix,
                             dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
