"""Files and folders the project writes: atomic writes with the user's umask, output paths
checked before any work, and temporary folders of our own (and their clean-up after a kill).

The rule this module serves: the project never deletes or replaces a file it did not write.
Temporary names carry the writer's process id, so a later run can tell a stale one (its
process is gone) from one a live run is still filling.

Standard library only (imported by the PyTorch stage and the JAX stage alike).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Iterator

from fmir_jax import errors


class OutputPathError(errors.UserError, ValueError):
  """An output path cannot be written: the message names the path and the fix."""


def umask_mode(directory: bool = False) -> int:
  """The permission bits a plain ``open``/``mkdir`` would give under the current umask."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary file path next to ``path``; renames it onto ``path`` on success.

  The file gets the user's umask permissions (``mkstemp`` alone would give 0600); on any
  error the temporary file is removed and ``path`` is left as it was.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise OutputPathError(f'{path} is a folder; pass a file path.')
  folder, name = os.path.split(path)
  os.makedirs(folder, exist_ok=True)
  suffix = ''.join(re.findall(r'(\.[A-Za-z0-9]+)', name)[-2:])   # keeps .nii.gz, .npz
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.tmp-{os.getpid()}-', suffix=suffix, dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_writable_dir(path: str, flag: str) -> None:
  """Refuses, before any work, a folder path that cannot be created or written.

  Args:
    path: the output folder (may not exist yet).
    flag: the option that named it, for the message (e.g. "--out").

  Raises:
    OutputPathError: ``path`` is a file, lies under a file, or its nearest existing
      ancestor is not writable.
  """
  full = os.path.abspath(path)
  if os.path.exists(full) and not os.path.isdir(full):
    raise OutputPathError(f'{flag} {path}: exists and is a file, not a folder; choose a '
                          'folder path.')
  anc = full
  while not os.path.exists(anc):
    anc = os.path.dirname(anc)
  if not os.path.isdir(anc):
    raise OutputPathError(f'{flag} {path}: {anc} is a file, so no folder can be made under '
                          'it; choose another path.')
  if not os.access(anc, os.W_OK | os.X_OK):
    raise OutputPathError(f'{flag} {path}: {anc} is not writable by this user; choose a '
                          'folder you can write to.')


def _temp_prefix(tag: str) -> str:
  return f'.{tag}.tmp-'


def make_temp_dir(parent: str, tag: str) -> str:
  """A new hidden folder ``parent/.TAG.tmp-PID-XXXX`` with the user's umask permissions."""
  os.makedirs(parent, exist_ok=True)
  path = tempfile.mkdtemp(prefix=f'{_temp_prefix(tag)}{os.getpid()}-', dir=parent)
  os.chmod(path, umask_mode(directory=True))
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temp_dirs(parent: str, tag: str) -> list[str]:
  """Removes ``make_temp_dir(parent, tag)`` folders whose process is gone (killed runs).

  Only names of our own pattern with a dead process id are touched. Returns what was removed.
  """
  if not os.path.isdir(parent):
    return []
  pattern = re.compile(re.escape(_temp_prefix(tag)) + r'(\d+)-[A-Za-z0-9_]+$')
  removed = []
  for name in sorted(os.listdir(parent)):
    m = pattern.match(name)
    path = os.path.join(parent, name)
    if m and os.path.isdir(path) and not os.path.islink(path) and not _alive(int(m.group(1))):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


# --------------------------------------------------------------------------- result folders


def check_result_dir(out: str, names, overwrite: bool, flag: str) -> None:
  """Refuses, before any work, a result folder that cannot be written, or that holds files
  of the names a command writes (an earlier result) unless ``overwrite``. Other files in it
  are allowed: they are never touched."""
  check_writable_dir(out, flag)
  if not os.path.isdir(out) or overwrite:
    return
  taken = [n for n in names if os.path.lexists(os.path.join(out, n))]
  if taken:
    raise OutputPathError(f'{flag} {out}: holds an earlier result ({", ".join(taken)}); pass '
                          '--overwrite to replace those files (other files in it are kept) '
                          f'or choose a new {flag}.')


def publish_result(tmp_dir: str, out: str, last: str, earlier: set[str],
                   overwrite: bool) -> None:
  """Moves the finished files of ``tmp_dir`` into the result folder ``out``.

  A new ``out`` is ``tmp_dir`` renamed (all or nothing). Into an existing one the files are
  moved one by one, ``last`` (the report) last; ``earlier`` names of an earlier result that
  this one does not write again are removed; nothing else in ``out`` is touched.
  """
  if not os.path.exists(out):
    os.replace(tmp_dir, out)
    return
  names = sorted(os.listdir(tmp_dir), key=lambda n: n == last)
  taken = [n for n in names if os.path.lexists(os.path.join(out, n))]
  if taken and not overwrite:       # appeared since the check at the start
    raise OutputPathError(f'{out}: {", ".join(taken)} appeared while this ran; nothing was '
                          'replaced. Pass --overwrite or choose a new folder.')
  for name in names:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out, name))
  for name in earlier - set(names):
    path = os.path.join(out, name)
    if os.path.isfile(path) and not os.path.islink(path):
      os.remove(path)
  os.rmdir(tmp_dir)

