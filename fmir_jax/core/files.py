"""Files and folders the project writes: atomic writes with the user's umask, output paths
checked before any work, and temporary folders of our own (and their clean-up after a kill).

The rule this module serves: the project never deletes or replaces a file it did not write.
Temporary names carry the writer's process id, so a later run can tell a stale one (its
process is gone) from one a live run is still filling.

Standard library only (imported by the PyTorch stage and the JAX stage alike).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator

from fmir_jax.core import errors


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
  if os.path.islink(full) and not os.path.exists(full):
    raise OutputPathError(f'{flag} {path}: is a link to {os.readlink(full)}, which does not '
                          'exist; create that folder or choose another path.')
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


# --------------------------------------------------------------------------- what we wrote
#
# Each result folder keeps MANIFEST: the sha256 of every file the project wrote there. A file
# of a name a command writes is "ours" only while its content still has a recorded digest;
# anything else at that name (the user's file, or ours edited since) is never replaced.

MANIFEST = '.fmir-written.json'


def file_digest(path: str) -> str:
  """sha256 of a file's bytes (hex)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _read_manifest(folder: str) -> dict[str, list[str]]:
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      listed = json.load(f).get('files', {})
  except (OSError, ValueError, AttributeError):
    return {}
  if not isinstance(listed, dict):
    return {}
  return {str(k): [str(d) for d in v] for k, v in listed.items() if isinstance(v, list)}


def _write_manifest(folder: str, listed: dict[str, list[str]]) -> None:
  with atomic_path(os.path.join(folder, MANIFEST)) as tmp, open(tmp, 'w') as f:
    json.dump({'written_by': 'fmir-jax', 'files': dict(sorted(listed.items()))}, f, indent=1)


def record_written(folder: str, digests: dict[str, str], keep_old: bool = False) -> None:
  """Records ``name -> sha256`` of files the project wrote in ``folder`` (a name's earlier
  digests are kept too with ``keep_old``: for the moment between recording and renaming)."""
  listed = _read_manifest(folder)
  for name, digest in digests.items():
    listed[name] = sorted(set(listed.get(name, [])) | {digest}) if keep_old else [digest]
  _write_manifest(folder, listed)


def is_ours(path: str) -> bool:
  """True when ``path`` is a plain file the project wrote and nobody has changed since."""
  if not os.path.isfile(path) or os.path.islink(path):
    return False
  folder, name = os.path.split(os.path.abspath(path))
  digests = _read_manifest(folder).get(name)
  return bool(digests) and file_digest(path) in digests


def check_replaceable(folder: str, names, overwrite: bool, flag: str) -> None:
  """Refuses to write ``names`` into ``folder`` where that would replace a file the project
  did not write (never), or an earlier result of ours without ``overwrite``."""
  present = [n for n in names if os.path.lexists(os.path.join(folder, n))]
  foreign = [n for n in present if not is_ours(os.path.join(folder, n))]
  if foreign:
    raise OutputPathError(
        f'{flag} {folder}: {", ".join(foreign)} {"was" if len(foreign) == 1 else "were"} not '
        'written by fmir-jax (or changed since) and is never replaced; move '
        f'{"it" if len(foreign) == 1 else "them"} away or choose another {flag}.')
  if present and not overwrite:
    raise OutputPathError(f'{flag} {folder}: holds an earlier result ({", ".join(present)}); '
                          'pass --overwrite to replace those files (other files in it are '
                          f'kept) or choose a new {flag}.')


@contextlib.contextmanager
def disk_errors(folder: str, flag: str) -> Iterator[None]:
  """Turns a full disk, a quota or a read-only folder met while writing into one line."""
  try:
    yield
  except OSError as e:
    if e.errno not in _DISK_ERRNOS:
      raise
    raise OutputPathError(f'{flag} {folder}: {os.strerror(e.errno).lower()} while writing '
                          f'{e.filename or "the results"}; nothing there was replaced. Free '
                          f'space or choose another {flag}.') from None


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def check_result_file(path: str, overwrite: bool, flag: str) -> None:
  """Refuses, before any work, a result file path that cannot be written or would replace a
  file under the rule of ``check_replaceable``."""
  folder, name = os.path.split(os.path.abspath(path))
  if os.path.isdir(os.path.join(folder, name)):
    raise OutputPathError(f'{flag} {path}: is a folder; pass a file path.')
  check_writable_dir(folder, flag)
  if os.path.isdir(folder):
    check_replaceable(folder, [name], overwrite, flag)


def write_result_file(path: str, data: bytes | str, overwrite: bool, flag: str) -> None:
  """Writes one result file under the rules of ``check_replaceable`` (``publish_result``)."""
  path = os.path.abspath(path)
  folder, name = os.path.split(path)
  check_result_file(path, overwrite, flag)
  with disk_errors(folder, flag):
    remove_stale_temp_dirs(folder, name)
    tmp = make_temp_dir(folder, name)
    try:
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
      publish_result(tmp, folder, name, (), overwrite, flag)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- result folders


def check_result_dir(out: str, names, overwrite: bool, flag: str) -> None:
  """Refuses, before any work, a result folder that cannot be written, or that holds files
  of the names a command writes: the user's (always) or an earlier result of ours (unless
  ``overwrite``). Other files in it are allowed: they are never touched."""
  check_writable_dir(out, flag)
  if os.path.isdir(out):
    check_replaceable(out, names, overwrite, flag)


def publish_result(tmp_dir: str, out: str, last: str, earlier, overwrite: bool,
                   flag: str = '--out') -> None:
  """Moves the finished files of ``tmp_dir`` into the result folder ``out`` and records them
  as ours (``MANIFEST``).

  A new ``out`` is ``tmp_dir`` renamed (all or nothing). Into an existing one the files are
  moved one by one, ``last`` (the report) last, after the same check as before the work
  (a file may have appeared meanwhile); names in ``earlier`` (what this kind of result
  writes) that this one does not write again are removed when they are ours; nothing else in
  ``out`` is touched.
  """
  names = sorted((n for n in os.listdir(tmp_dir) if n != MANIFEST), key=lambda n: n == last)
  digests = {n: file_digest(os.path.join(tmp_dir, n)) for n in names}
  if not os.path.exists(out):
    _write_manifest(tmp_dir, {n: [d] for n, d in digests.items()})
    os.replace(tmp_dir, out)
    return
  check_replaceable(out, names, overwrite, flag)
  record_written(out, digests, keep_old=True)
  for name in names:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out, name))
  stale = [n for n in set(earlier) - set(names) if is_ours(os.path.join(out, n))]
  for name in stale:
    os.remove(os.path.join(out, name))
  listed = _read_manifest(out)
  listed.update({n: [d] for n, d in digests.items()})
  for name in stale:
    listed.pop(name, None)
  _write_manifest(out, listed)
  shutil.rmtree(tmp_dir, ignore_errors=True)
