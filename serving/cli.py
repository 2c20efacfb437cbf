"""`vlpipe serve`: the KServe predictor for one checkpoint (registered by `vlpipe.pipelines.cli`).

vlpipe serve models:/internvl3-2b@champion --prm-uri s3://models/internvl3-2b-prm --host 0.0.0.0 \\
    --batch-max-size 32 --batch-wait-ms 5 --max-queue 512 --request-timeout-s 120

Every `ServingLimits` field is a flag, named after the field with dashes (`max_body_bytes` → `--max-body-bytes`),
generated from the model's fields (the InferenceService renders its args the same way). A flag left out keeps
the field's default; the values are validated by `ServingLimits` itself (a bad one exits 2 naming the flag).
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from vlpipe.serving.limits import ServingLimits


def limit_flag(field: str) -> str:
    """The `vlpipe serve` flag of a `ServingLimits` field: `max_body_bytes` → `--max-body-bytes`."""
    return "--" + field.replace("_", "-")


def _field_docs() -> dict[str, str]:
    """Each field's description from the `Attributes:` section of `ServingLimits`' docstring."""
    doc = inspect.cleandoc(ServingLimits.__doc__ or "")
    section = doc.split("Attributes:", 1)[-1]
    docs: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match and match.group(1) in ServingLimits.model_fields:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith("        "):
            docs[current] += " " + line.strip()
    return docs


def limits_from_flags(values: dict[str, Any]) -> ServingLimits:
    """`ServingLimits` from the flags given (None: not given, the default applies).

    Raises:
        typer.BadParameter: a value `ServingLimits` refuses, naming the flag.
    """
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return ServingLimits(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error.get("loc", ())]
            message = error.get("msg", "invalid").removeprefix("Value error, ")
            for field in sorted(ServingLimits.model_fields, key=len, reverse=True):
                message = re.sub(rf"\b{field}\b", limit_flag(field), message)
            problems.append(f"{limit_flag(loc[0])}: {message}" if loc else message)
        raise typer.BadParameter("; ".join(problems)) from None


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
    **limit_values: Any,
) -> None:
    """Serve a checkpoint over KServe V1/V2 and OpenAI-compatible chat until SIGINT/SIGTERM."""
    from vlpipe.serving.predictor import VLPipeModel, VLPipeModelServer

    try:
        limits = limits_from_flags(limit_values)
    except typer.BadParameter as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    model = VLPipeModel(name, model_uri, prm_uri=prm_uri, limits=limits)
    try:
        model.load()
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    VLPipeModelServer(host=host, http_port=port, limits=model.limits).start([model])


def _with_limit_options() -> None:
    """Give `serve_command` one keyword option per `ServingLimits` field (typer reads `__signature__`)."""
    base = inspect.signature(serve_command, eval_str=True)
    params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    annotations = dict(serve_command.__annotations__)
    annotations.pop("limit_values", None)
    docs = _field_docs()
    for field, info in ServingLimits.model_fields.items():
        kind = info.annotation
        help_text = f"{docs.get(field, field)} (default: {info.default})"
        annotation = Annotated[
            kind | None, typer.Option(limit_flag(field), help=help_text, show_default=False)
        ]
        params.append(
            inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
        annotations[field] = annotation
    serve_command.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    serve_command.__annotations__ = annotations


_with_limit_options()
