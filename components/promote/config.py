"""Settings of the promote step (torch-free)."""

from __future__ import annotations

import re

from pydantic import Field

from vlpipe.components.pipeline_run.config import TaskConfig
from vlpipe.serving.promote import PromotionConfig

MODEL_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)/(?P<version>[1-9][0-9]*)$")
"""A registered model version as the register step returns it: `models:/<name>/<version>`."""


def parse_model_uri(model_uri: str) -> tuple[str, str]:
    """`models:/<name>/<version>` → (name, version).

    Raises:
        ValueError: any other form (an alias such as `models:/name@champion` names no fixed version).
    """
    match = MODEL_URI.match(model_uri)
    if match is None:
        raise ValueError(
            f"expected a registered model version 'models:/<name>/<version>' (the register step's output), "
            f"got {model_uri!r}"
        )
    return match["name"], match["version"]


class PromoteConfig(TaskConfig):
    """The `promote-model` step's settings: the recipe's gates (`vlpipe.serving.promote.PromotionConfig`)."""

    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
