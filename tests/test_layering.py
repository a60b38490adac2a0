"""One dependency direction: the worker side never imports the driver side, MLflow or Optuna."""

import ast
from pathlib import Path

TRAINABLES = Path(__file__).resolve().parents[1] / "trainables"
FORBIDDEN = {"study", "mlflow", "optuna"}


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
