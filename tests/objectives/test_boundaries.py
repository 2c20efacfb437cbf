"""Package boundaries of objectives/: torch-free configs, no kfp, no I/O libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vlpipe.objectives as objectives

PACKAGE_DIR = Path(objectives.__file__).parent
FORBIDDEN = {"kfp", "mlflow", "boto3", "fsspec", "s3fs", "yaml"}


def test_configs_import_without_torch() -> None:
    # Pipeline and stage configs embed these classes; compiling a pipeline must not need torch.
    code = "import sys, vlpipe.objectives.config; assert 'torch' not in sys.modules, 'vlpipe.objectives.config imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE_DIR.parent)


def test_no_forbidden_imports() -> None:
    for path in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
