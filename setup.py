"""Installs the top-level folders as the `vlpipe.*` packages (`model/` → `vlpipe.model`, ...).

pyproject.toml holds everything else; only the folder → package mapping is computed here, so a new stage folder
(with its `__init__.py`) is installed without a list to update.
"""

from setuptools import find_packages, setup

FOLDERS = ("model", "objectives", "tracking", "serving", "components", "infra", "pipelines")
"""The project's packages, lowest layer first (README "Architecture"; enforced by tests/test_layering.py)."""

setup(
    package_dir={f"vlpipe.{folder}": folder for folder in FOLDERS},
    packages=[f"vlpipe.{name}" for name in find_packages(include=[f"{f}*" for f in FOLDERS])],
    package_data={"": ["*.yaml", "*.json", "*.jinja"]},
)
