"""notebooks/quickstart.ipynb runs top to bottom on CPU (small settings), so it cannot rot."""
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _outputs(cell, kind):
  return [o for o in cell.get("outputs", []) if kind in o.get("data", {}) or
          o.get("output_type") == kind]


def test_quickstart_notebook_runs_and_shows_sis_images_and_curves(monkeypatch):
  monkeypatch.setenv("OVERINTERP_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # Compilation dominates at these sizes: halves the run (as tests/conftest.py's fast_compile).
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook without outputs"
  # Runs from the repository root, so it imports this checkout's package.
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not any(_outputs(c, "error") for c in code)
  figures = [c for c in code if _outputs(c, "image/png")]
  assert len(figures) == 3  # SIS images, confidence curves, 5% subsets
  text = "".join(o.get("text", "") for c in code for o in c.get("outputs", []))
  assert "SIS of" in text and "5% backward-selection subsets: accuracy" in text
  assert "recorded" in text  # the shipped model's accuracy, next to its record's
