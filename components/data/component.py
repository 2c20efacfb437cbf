"""Kubeflow components of the data steps: prepare-data, init-model and mix-data (thin shells).

Each body imports vlpipe inside (lightweight components ship only the function's source) and calls one
entrypoint, which validates the JSON settings with the step's pydantic class.
"""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(
    config: str,
    data: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
    data_root: str = "",
):
    """Write the demo dataset (demo recipes) and validate the meta files, annotations and data files.

    Args:
        config: `vlpipe.components.data.config.PrepareDataConfig` as JSON.
        data_root: the pipeline parameter `data_root` ("": the recipe's `data.root`).
    """
    from vlpipe.components.data.prepare import prepare_data_task

    prepare_data_task(config, dataset=data, metrics=metrics, report=report, data_root=data_root)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def init_model(
    config: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Write the starting checkpoint: random (tiny/small) or composed from a pretrained ViT and LLM.

    Args:
        config: `vlpipe.components.data.config.InitModelConfig` as JSON.
    """
    from vlpipe.components.data.init_model import init_model_task

    init_model_task(config, dataset=data, model=model, metrics=metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def mix_data(
    config: str,
    data: Input[Dataset],
    model: Input[Model],
    mixture: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Build and record the provenance manifest of the pre-training and SFT mixtures.

    Args:
        config: `vlpipe.components.data.config.MixConfig` as JSON.
    """
    from vlpipe.components.data.mix import mix_data_task

    mix_data_task(
        config,
        dataset=data,
        model=model,
        mixture=mixture,
        metrics=metrics,
        report=report,
    )
