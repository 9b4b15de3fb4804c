"""adapter_core.data is the base training and evaluation share; evaluation does not depend on training."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "adapter_core"


def imported_packages(folder: Path) -> set[str]:
    """The adapter_core subpackages or modules that the modules of `folder` import (relative imports)."""
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adapter_core."):
                found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("package, forbidden", [("data", {"training", "evaluation", "model"}),
                                                ("evaluation", {"training"})])
def test_the_data_package_is_the_shared_base(package, forbidden):
    assert not imported_packages(PACKAGE / package) & forbidden
