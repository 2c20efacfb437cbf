"""`vlpipe eval --config FILE`: the command function (registered by `vlpipe.pipelines.cli`) and its output table.

Heavy imports (torch, transformers, mlflow) happen inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _summary_table(metrics: dict) -> Table:
    table = Table(title=f"Best-of-{metrics['n']} evaluation ({metrics['aggregation']} PRM aggregation)")
    for column in (
        "scope",
        "items",
        "skipped",
        "pass@1",
        f"Best-of-{metrics['n']}",
        "majority",
        "oracle",
        "items/s",
    ):
        table.add_column(column, justify="left" if column == "scope" else "right")
    scopes = [*metrics["benchmarks"].items(), ("overall", metrics["overall"])]
    for name, m in scopes:
        table.add_row(
            name if "protocol" not in m else f"{name} ({m['protocol']})",
            str(m["items"]),
            str(m["skipped"]),
            f"{m['pass_at_1']:.3f}",
            f"{m['best_of_n']:.3f}",
            f"{m['majority']:.3f}",
            f"{m['oracle']:.3f}",
            f"{m['items_per_second']:.2f}",
        )
    return table


def eval_command(
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        readable=True,
        help="Evaluation config (YAML or JSON).",
    ),
) -> None:
    """Run the Best-of-N evaluation described by an `EvalConfig` file and print its metrics.

    Exits with code 2 on an invalid config and 1 on unusable benchmark data (the message names the file) or a
    judge endpoint that refuses its requests.
    """
    from pydantic import ValidationError

    from vlpipe.components.evaluate.benchmarks import BenchmarkError
    from vlpipe.components.evaluate.config import load_eval_config
    from vlpipe.components.evaluate.judge import JudgeError
    from vlpipe.components.evaluate.stage import run_evaluation

    try:
        cfg = load_eval_config(config)
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    try:
        metrics = run_evaluation(cfg, console)
    except (BenchmarkError, FileNotFoundError, JudgeError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(_summary_table(metrics))
    console.print(f"metrics: {cfg.output_dir}/metrics.json, MLflow run {metrics['mlflow']['run_id']}")
