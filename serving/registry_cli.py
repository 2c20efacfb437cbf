"""`vlpipe promote`, `vlpipe rollback` and `vlpipe compare` (registered by `vlpipe.pipelines.cli`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def promote_command(
    model: str = typer.Option(..., "--model", help="Registered model name."),
    version: str = typer.Option(..., "--version", help="Candidate model version."),
    eval_run: str | None = typer.Option(
        None, "--eval-run", help="Eval run whose overall/* metrics to attach."
    ),
    gates: Path | None = typer.Option(
        None, "--gates", help="YAML/JSON PromotionConfig (default gates otherwise)."
    ),
) -> None:
    """Promote a model version to `champion` if it passes every gate against the current champion."""
    import yaml

    from vlpipe.serving.promote import PromotionConfig, attach_eval_metrics, promote

    config = PromotionConfig.model_validate(yaml.safe_load(gates.read_text())) if gates else PromotionConfig()
    if eval_run:
        attach_eval_metrics(model, version, eval_run)
    decision = promote(model, version, config)
    console.print_json(decision.model_dump_json())
    if decision.decision == "rejected":
        raise typer.Exit(3)


def rollback_command(model: str = typer.Option(..., "--model", help="Registered model name.")) -> None:
    """Make the `previous` version the champion again."""
    from vlpipe.serving.promote import rollback

    try:
        console.print_json(rollback(model).model_dump_json())
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


def compare_command(
    ids: list[str] = typer.Argument(..., help="MLflow run ids: pipeline (parent) runs or stage runs."),
    out: Path = typer.Option(Path(".vlpipe/compare"), help="Where the loss-curve PNG and the JSON table go."),
) -> None:
    """Key params and final metrics per stage across runs, and their loss curves (PNG)."""
    from vlpipe.serving.compare import KEY_METRICS, KEY_PARAMS, comparison_rows, plot_loss_curves

    try:
        rows = comparison_rows(ids)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    columns = ["pipeline", "run", "stage", "recipe", "status", *KEY_PARAMS, *KEY_METRICS]
    table = Table(title="vlpipe compare")
    for column in columns:
        table.add_column(column)
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        table.add_row(*cells)
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    console.print(f"loss curves: {plot_loss_curves(rows, out / 'loss_curves.png')}")
