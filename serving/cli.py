"""`vlpipe serve`: the KServe predictor for one checkpoint (registered by `vlpipe.pipelines.cli`).

vlpipe serve models:/internvl3-2b@champion --prm-uri s3://models/internvl3-2b-prm --host 0.0.0.0
"""

from __future__ import annotations

from typing import Annotated

import typer


def serve_command(
    model_uri: Annotated[
        str,
        typer.Option(
            "--model-uri",
            help="Checkpoint: a directory, s3://bucket/prefix, or an MLflow model (models:/name@alias, "
            "models:/name/version).",
        ),
    ],
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    prm_uri: Annotated[
        str | None, typer.Option(help="Process reward model checkpoint for best_of (any model URI form).")
    ] = None,
    name: Annotated[str, typer.Option(help="Model name in the routes and in chat requests.")] = "vlpipe",
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 in a pod.")] = "127.0.0.1",
) -> None:
    """Serve a checkpoint over KServe V1/V2 and OpenAI-compatible chat until SIGINT/SIGTERM."""
    from vlpipe.serving.predictor import VLPipeModel, VLPipeModelServer

    model = VLPipeModel(name, model_uri, prm_uri=prm_uri)
    try:
        model.load()
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    VLPipeModelServer(host=host, http_port=port, limits=model.limits).start([model])
