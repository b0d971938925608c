"""What a folder holds, byte for byte: for tests that check nothing was written, changed or
left behind."""
import os


def snapshot(root) -> dict:
  """{relative path: bytes (files) or None (folders)} of everything under root."""
  out = {}
  for d, dirs, names in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root)] = None
    for n in names:
      path = os.path.join(d, n)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out
