"""The release a component runs on: one container image per vlpipe version.

Torch-free and cheap to import: every component definition module reads `IMAGE` at import time.
"""

from __future__ import annotations

from vlpipe.tracking.runs import package_version

IMAGE_REPOSITORY = "ghcr.io/vlpipe/vlpipe"
VERSION = package_version()
IMAGE = f"{IMAGE_REPOSITORY}:{VERSION}"
"""The image every component runs on, tagged with the package version (the Dockerfile builds it)."""
