"""Layering: a config is plain data, preprocessing stands alone, odkd's modules import each other without
cycles, and every script answers --help without loading torch.

What a module loads is checked in a fresh interpreter: this one has imported torch already."""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(path.name for path in (ROOT / "scripts").glob("*.py"))

# Runs scripts/<argv[1]> with --help as `python scripts/<name> --help` would, then says whether torch loaded.
_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    assert done.code in (0, None), f"--help exited with {done.code}"
print("torch loaded" if "torch" in sys.modules else "no torch")
"""


def loaded_modules(code: str) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter in the repository root."""
    code += "\nimport sys; print(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_importing_the_config_loads_no_torch_opencv_or_albumentations():
    loaded = loaded_modules("import odkd.config")
    assert not loaded & {"torch", "cv2", "albumentations"}
    assert {name for name in loaded if name.startswith("odkd")} == {
        "odkd",
        "odkd.augmentation",
        "odkd.class_names",
        "odkd.config",
        "odkd.model_names",
        "odkd.postprocess_settings",
    }


def test_preprocessing_imports_nothing_of_odkd():
    loaded = loaded_modules("import odkd.preprocessing")
    assert {name for name in loaded if name.startswith("odkd")} == {"odkd", "odkd.preprocessing"}


def _odkd_imports(module: str, path) -> set[str]:
    """The odkd modules (or packages) that the file ``path`` of ``module`` names in any import statement:
    at the top, in a function or under TYPE_CHECKING."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {alias.name for alias in node.names if alias.name.startswith("odkd")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("odkd"):
            named |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return named - {module}


def test_odkd_modules_import_each_other_without_cycles():
    paths = {".".join(path.relative_to(ROOT).with_suffix("").parts): path for path in (ROOT / "odkd").rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in paths.items()}
    graph = {name: _odkd_imports(name, path) & modules.keys() for name, path in modules.items()}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_answer_help_without_torch(script):
    command = [sys.executable, "-c", _HELP, f"scripts/{script}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and done.stdout.rstrip().endswith("no torch")
