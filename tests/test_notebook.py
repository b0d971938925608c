"""notebooks/fmir_colab.ipynb runs top to bottom at smoke size, and is committed without
outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

# End to end: executes the notebook in a kernel (the unit run leaves it out: -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'fmir_colab.ipynb')


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          'strip the outputs before committing (jupyter nbconvert --clear-output --inplace)')


def test_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
  monkeypatch.setenv('FMIR_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('FMIR_NOTEBOOK_OUT', str(tmp_path / 'out'))
  monkeypatch.setenv('FMIR_ROOT', ROOT)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.delenv('HF_TOKEN', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': ROOT}}).execute()
  text = '\n'.join(o.get('text', '') or str(o.get('data', {}).get('text/plain', ''))
                   for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'backbone: mind' in text
  assert 'warped_moving.nii.gz' in text          # the register cell's listing
  assert any('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code'
             for o in c.outputs)                  # loss curve and pair figure are inline
