"""`vlpipe platform up|down|status|env`: the local platform (MLflow server + S3 store on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

platform_app = typer.Typer(
    help="The local platform: an MLflow tracking server and an S3 store (moto) on loopback.",
    no_args_is_help=True,
)
console = Console()


def _home(home: Path | None) -> Path | None:
    return home.resolve() if home is not None else None


@platform_app.command("up")
def platform_up(
    home: Path = typer.Option(None, help="VLPIPE_HOME whose platform/ directory holds the state."),
    auth: bool = typer.Option(
        True, help="MLflow basic auth (random admin password, drawn once and kept in credentials.json)."
    ),
) -> None:
    """Start the servers (or find them running) with the stores and credentials of the last run, create the
    buckets, and say how to use them."""
    from vlpipe.infra.local_platform import PlatformError, up

    try:
        platform = up(_home(home), auth=auth)
    except PlatformError as exc:
        console.print(f"[red]platform failed to start:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    from vlpipe.infra.local_platform import CREDENTIAL_VARIABLES

    env_file = platform.directory / "env"
    console.print(f"MLflow tracking server: {platform.tracking_uri}   S3 (moto): {platform.s3_endpoint}")
    console.print("The environment to export (credentials masked here):")
    for name, value in sorted(platform.env.items()):
        console.print(f"  export {name}={'***' if name in CREDENTIAL_VARIABLES else value}", soft_wrap=True)
    console.print(f"The values are in {env_file} (mode 0600). Point your shell at the platform with:")
    console.print(f"  source {env_file}", soft_wrap=True)
    console.print('or: eval "$(vlpipe platform env)"; stop it with `make platform-down`.')


@platform_app.command("down")
def platform_down(
    home: Path = typer.Option(None, help="VLPIPE_HOME whose platform/ directory holds the state."),
    purge: bool = typer.Option(False, help="Also delete the stores, credentials, logs and environment file."),
) -> None:
    """Stop the servers; the stores and credentials stay for the next `up` (unless --purge)."""
    from vlpipe.infra.local_platform import down

    stopped = down(_home(home), purge=purge)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@platform_app.command("status")
def platform_status(
    home: Path = typer.Option(None, help="VLPIPE_HOME whose platform/ directory holds the state."),
) -> None:
    """Print what is running as JSON (credentials masked); exit code 1 when nothing is."""
    from vlpipe.infra.local_platform import status

    info = status(_home(home))
    console.print_json(json.dumps(info))
    if not info["running"]:
        raise typer.Exit(1)


@platform_app.command("env")
def platform_env(
    home: Path = typer.Option(None, help="VLPIPE_HOME whose platform/ directory holds the state."),
) -> None:
    """Print `export` lines for the running platform (for `eval "$(vlpipe platform env)"`)."""
    from vlpipe.infra.local_platform import load

    platform = load(_home(home))
    if platform is None:
        typer.echo("no local platform is running; start it with `make platform-up`", err=True)
        raise typer.Exit(1)
    typer.echo(platform.export_lines(), nl=False)
