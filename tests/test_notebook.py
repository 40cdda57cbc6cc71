"""notebooks/quickstart.ipynb runs top to bottom on CPU (small settings), so it cannot rot."""
import os

import nbformat
import pytest
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


# ------------------------------------------------------------------- the install cell


def _install_cell():
  """The functions of the notebook's install cell (running it here installs nothing:
  the package imports)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code" and "def ensure_installed" in c.source)
  assert not any("your-org" in c.source for c in nb.cells)  # no placeholder address
  namespace = {}
  exec(compile(cell.source, "install cell", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["copy"] is None  # this checkout imports: nothing was installed
  return namespace


def _checkout(root):
  os.makedirs(os.path.join(root, "overinterp_jax"))
  open(os.path.join(root, "setup.py"), "w").close()
  open(os.path.join(root, "overinterp_jax", "__init__.py"), "w").close()
  return str(root)


def _touch(path, mtime):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "w").close()
  os.utime(path, (mtime, mtime))
  return str(path)


def test_install_cell_installs_the_first_copy_it_finds(tmp_path):
  cell = _install_cell()
  installed = []

  def install(places):
    return cell["ensure_installed"](places, pip=installed.append, importable=lambda: False)

  content, drive = tmp_path / "content", tmp_path / "drive"
  content.mkdir()
  drive.mkdir()
  places = (str(content), str(content / "overinterp_jax*"), str(drive))
  # Nothing there: the error says what to upload and how to build it; nothing installed.
  with pytest.raises(FileNotFoundError, match=r"Upload its wheel.*pip wheel \. --no-deps"):
    install(places)
  assert installed == []
  # A wheel in Drive; then a newer one uploaded beside the notebook wins over it.
  in_drive = _touch(drive / "overinterp_jax-0.1.0-py3-none-any.whl", 1000)
  assert install(places) == in_drive
  older = _touch(content / "dist" / "overinterp_jax-0.1.0-py3-none-any.whl", 2000)
  newest = _touch(content / "overinterp_jax-0.2.0-py3-none-any.whl", 3000)
  assert install(places) == newest
  os.remove(newest)
  assert install(places) == older  # a wheel in dist/ too
  # An unpacked repository (a GitHub zip is overinterp_jax-main/) comes before wheels of
  # later places; in the same place a checkout comes first.
  os.remove(older)
  checkout = _checkout(content / "overinterp_jax-main")
  assert install(places) == checkout
  _touch(content / "overinterp_jax-main.zip", 4000)
  assert install(places) == str(content / "overinterp_jax-main.zip")  # "." comes first
  assert installed == [in_drive, newest, older, checkout, str(content / "overinterp_jax-main.zip")]
  # Importable: nothing to do.
  assert cell["ensure_installed"](places, pip=installed.append) is None
  assert len(installed) == 5
