"""What a folder holds, byte for byte: for tests that check nothing was written, changed or
left behind."""
import os


def snapshot(root) -> dict:
  """{relative path: bytes (files), None (folders) or ('link', target)} of everything under
  root."""
  out = {}
  for d, dirs, names in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root)] = None
    for n in names:
      path = os.path.join(d, n)
      if os.path.islink(path):
        out[os.path.relpath(path, root)] = ('link', os.readlink(path))
        continue
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out
