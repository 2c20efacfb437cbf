"""The release a component runs on: one container image per vlpipe version.

Torch-free and cheap to import: every component definition module reads `IMAGE` at import time.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

IMAGE_REPOSITORY = "ghcr.io/vlpipe/vlpipe"


def package_version() -> str:
    """The installed vlpipe version (`0+unknown` when the package is not installed)."""
    try:
        return version("vlpipe")
    except PackageNotFoundError:
        return "0+unknown"


VERSION = package_version()
IMAGE = f"{IMAGE_REPOSITORY}:{VERSION}"
"""The image every component runs on, tagged with the package version (the Dockerfile builds it)."""
