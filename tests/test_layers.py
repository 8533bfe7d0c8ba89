"""The packages import only downward: common is the ground floor; the client (what services install) and
build_engine stand on it side by side; model_repo on those; benchmarks on everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAY_IMPORT = {
    "common": set(),
    "client": {"common"},
    "build_engine": {"common"},
    "model_repo": {"common", "client", "build_engine"},
    "benchmarks": {"common", "client", "build_engine", "model_repo"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MAY_IMPORT)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {f"{path.relative_to(ROOT)} imports {other}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for other in imported_packages(path) - MAY_IMPORT[package] - {package}}
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom client.errors import ClientError\nimport model_repo.server as s\n")
    assert imported_packages(bad) == {"client", "model_repo"}
