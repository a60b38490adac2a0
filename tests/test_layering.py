"""The borders the architecture promises (docs/architecture.md), checked on the source with ``ast``:
the worker side never imports the driver side, MLflow or Optuna; only three files import Ray."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINABLES = ROOT / "trainables"
FORBIDDEN = {"study", "mlflow", "optuna"}
# Ray's API has changed often: keep every call to it in these files, so the next change is a small edit.
RAY_FILES = {"trainables/ray_train.py", "study/tuner.py", "study/ray_session.py"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_trainables_never_import_the_driver_side():
    offenders = {str(p.relative_to(TRAINABLES)): sorted(imported_roots(p) & FORBIDDEN)
                 for p in TRAINABLES.rglob("*.py") if imported_roots(p) & FORBIDDEN}
    assert offenders == {}
    assert len(list(TRAINABLES.rglob("*.py"))) > 5  # the walk really saw the package


def test_only_the_ray_border_files_import_ray():
    sources = [p for package in ("study", "trainables") for p in (ROOT / package).rglob("*.py")]
    importers = {str(p.relative_to(ROOT)) for p in sources if "ray" in imported_roots(p)}
    assert importers == RAY_FILES
