"""Every notebook under experiments/notebooks runs top to bottom without a cell error.

The kernel is started from this interpreter (`sys.executable`), whatever `python3` kernelspec a
user or system Jupyter directory may hold, so the notebooks run in the test's virtualenv. Cells
run with the repository root as working directory.
"""

import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))


class _ThisPythonKernelSpecs(KernelSpecManager):
  """Resolves the `python3` kernel to an ipykernel running in this interpreter."""

  def get_kernel_spec(self, kernel_name):
    if kernel_name != "python3":
      return super().get_kernel_spec(kernel_name)
    return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name="Python 3 (test interpreter)", language="python")


def test_there_are_notebooks():
  assert NOTEBOOKS, "no notebooks under experiments/notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  km = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisPythonKernelSpecs())
  client = NotebookClient(nb, km=km, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
