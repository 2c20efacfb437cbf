"""`vlpipe prm-data --config FILE`: on-policy PRM data outside a pipeline (the `sample-prm-data` step's work).

Heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def prm_data_command(
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        readable=True,
        help="A PRMSampleConfig file (YAML or JSON): policy, source, output, n, temperature, labeler, ...",
    ),
) -> None:
    """Sample N solutions per source item from a policy, label every step, write the PRM's JSONL.

    Exits with code 2 on an invalid config and 1 on an unusable source (the message names the file).
    """
    import yaml
    from pydantic import ValidationError

    from vlpipe.components.prm_data.stage import PRMSampleConfig, sample_prm_data

    try:
        cfg = PRMSampleConfig.model_validate(yaml.safe_load(config.read_text()))
    except (ValidationError, ValueError, yaml.YAMLError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    try:
        counts = sample_prm_data(cfg)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    steps = counts["positive_steps"] + counts["negative_steps"]
    console.print(
        f"{counts['solutions']} solutions of {counts['items']} items written to {cfg.output} "
        f"({counts['final_correct'] / max(1, counts['solutions']):.1%} with the right answer, "
        f"{counts['positive_steps'] / max(1, steps):.1%} of {steps} steps right; "
        f"{counts['duplicate_solutions']} duplicates and {counts['empty_solutions']} empty not written; "
        f"{counts['skipped_items']} items and {counts['skipped_source_lines']} source lines skipped; "
        f"{counts['items_per_second']} items/s)"
    )
    if counts["skipped_source_lines"]:
        console.print(json.dumps(counts["source_quarantine"], indent=2))
