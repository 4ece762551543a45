"""The wheel is the library: built with ``python -m build``, it holds no research code, and
installed into a fresh virtualenv the README's Python example runs and ``insightv run``
answers with the demo agents it carries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out), str(ROOT)], check=True, capture_output=True)
    [built] = out.glob("insightv_agents-*.whl")
    return built


def test_the_wheel_holds_the_library_and_the_demo_agents_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if "insightv_research" in name or "/shapes/" in name
                or "reproduce" in name]
    for needed in ("insightv_agents/__init__.py", "insightv_agents/py.typed",
                   "insightv_agents/demo/demo.json",
                   "insightv_agents/demo/reasoner/model.safetensors",
                   "insightv_agents/demo/summary/model.safetensors"):
        assert needed in names, needed


def test_installed_in_a_fresh_virtualenv_it_runs_the_readme_and_the_demo(
        wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    # Its dependencies come from this environment's site-packages, added as a plain path: its
    # .pth files (this checkout's editable installs among them) are not read from there.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")

    where = subprocess.run([str(python), "-c", "import insightv_agents as m; print(m.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv))
    research = subprocess.run([str(python), "-c", "import insightv_research"], cwd=tmp_path,
                              capture_output=True, text=True)
    assert research.returncode != 0 and "No module named 'insightv_research'" in research.stderr

    example = re.search(r"## Python\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(),
                        re.S)
    assert example is not None
    subprocess.run([str(python), "-c", example.group(1)], check=True, cwd=tmp_path)

    run = subprocess.run([str(venv / "bin" / "insightv"), "run", "--image",
                          "examples/shapes.png", "--question",
                          "How many shapes are left if all large shapes are removed?", "--json"],
                         check=True, capture_output=True, text=True, cwd=tmp_path)
    out = json.loads(run.stdout[run.stdout.index("{"):])
    assert out["status"] == "ok" and out["answer"] == "2"
