"""The `vlpipe` command line. Heavy imports (torch, transformers) happen inside the commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="vlpipe: the InternVL3 training recipe as pipelines.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
demo_app = typer.Typer(help="The local end-to-end demo (`make run`).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(demo_app, name="demo")
deepspeed_app = typer.Typer(help="DeepSpeed configs.", no_args_is_help=True)
app.add_typer(deepspeed_app, name="deepspeed")
console = Console()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@model_app.command("info")
def model_info(
    preset: str = typer.Option(..., help="Preset name: tiny, small, 1b, 2b, 8b."),
    vocab_size: int = typer.Option(512, help="Vocabulary size for presets that take it from the tokenizer."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print a preset's shapes and its parameter count computed on the meta device."""
    from model.build import meta_parameter_count
    from model.presets import get_preset

    try:
        p = get_preset(preset)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from exc
    counts = meta_parameter_count(p, vocab_size=vocab_size)
    info = {
        "preset": p.name,
        "params_total": counts.total,
        "params_vision": counts.vision,
        "params_projector": counts.projector,
        "params_language": counts.language,
        "published_params": p.published_params,
        "tile_size": p.vision.image_size,
        "tokens_per_tile": p.tokens_per_tile,
        "max_tiles": p.max_tiles,
        "vocab_size": p.text.vocab_size or vocab_size,
    }
    if p.published_params:
        info["deviation_from_published"] = round(counts.total / p.published_params - 1, 5)
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"vlpipe preset {p.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


@model_app.command("init")
def model_init(
    preset: str = typer.Option(..., help="Preset name."),
    out: str = typer.Option(..., help="Output directory (local or s3://)."),
    vision: str = typer.Option(None, help="Pretrained InternViT HF directory (native pre-training init)."),
    llm: str = typer.Option(
        None, help="Pretrained base LLM HF directory (Qwen2.5) for native pre-training init."
    ),
    tokenizer: str = typer.Option(None, help="Tokenizer directory (default: the LLM's)."),
    data: str = typer.Option(
        None, help="Demo/InternVL dataset directory whose texts train the BPE tokenizer."
    ),
    vocab_size: int = typer.Option(512, help="BPE vocabulary size for a random init."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Write a starting checkpoint: random (tiny/small) or composed from a pretrained ViT and LLM."""
    from model.init import init_composed, init_random

    if (vision is None) != (llm is None):
        raise typer.BadParameter("pass both --vision and --llm, or neither", param_hint="--vision/--llm")
    try:
        if vision:
            path = init_composed(
                preset, out, vision_uri=vision, llm_uri=llm, tokenizer_uri=tokenizer, seed=seed
            )
        else:
            corpus = None
            if data:
                from model.data.demo import iter_demo_texts

                corpus = list(iter_demo_texts(data))
            path = init_random(preset, out, corpus=corpus, vocab_size=vocab_size, seed=seed)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {preset} checkpoint to {path}")


@data_app.command("demo")
def data_demo(
    out: str = typer.Option(..., help="Output directory (local or s3://bucket/prefix)."),
    seed: int = typer.Option(0, help="Generation seed."),
    size: str = typer.Option("default", help="default (the small-preset demo) or tiny (tests)."),
    overwrite: bool = typer.Option(False, help="Replace an existing non-empty output."),
) -> None:
    """Write the demo dataset (text corpus, captions, reasoning task, MPO pairs, PRM data)."""
    from model.data.demo import DemoSizes, write_demo_dataset

    sizes = DemoSizes.tiny() if size == "tiny" else DemoSizes()
    summary = write_demo_dataset(out, seed=seed, sizes=sizes, overwrite=overwrite)
    console.print_json(summary.model_dump_json())


@demo_app.command("run")
def demo_run(
    out: str = typer.Option(".vlpipe/run", help="Working directory for the demo."),
    preset: str = typer.Option("tiny", help="Model preset."),
    steps: int = typer.Option(400, help="Training steps of the smoke SFT (packed rows of 1024 tokens)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Run what exists end to end: demo data → model init → a short SFT → save/reload → generation."""
    from pipelines.demo import run_demo

    summary = run_demo(Path(out), preset=preset, steps=steps, seed=seed, console=console)
    console.print_json(json.dumps(summary))


@app.command("train", context_settings={"allow_extra_args": False})
def train(
    stage: str = typer.Argument(..., help="pretrain, sft, mpo or prm."),
    config: Path = typer.Option(..., "--config", "-c", help="Stage config (YAML or JSON)."),
    summary: Path | None = typer.Option(None, help="Write the stage summary JSON here."),
) -> None:
    """Train one stage from a config file (also under `torchrun` / `deepspeed` launchers)."""
    from pydantic import ValidationError

    from components.training.config import STAGE_CONFIGS, load_stage_config

    if stage not in STAGE_CONFIGS:
        raise typer.BadParameter(f"choose one of {', '.join(STAGE_CONFIGS)}", param_hint="STAGE")
    try:
        cfg = load_stage_config(config, stage)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]invalid config {config}:[/red] {exc}")
        raise typer.Exit(2) from exc
    from components.training.entrypoint import run_stage

    result = run_stage(stage, cfg)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result, indent=2, default=str))
    console.print_json(json.dumps(result, default=str))


@deepspeed_app.command("render")
def deepspeed_render(
    out: Path = typer.Option(None, help="Directory (default: the package's infra/deepspeed/)."),
) -> None:
    """Write the reference DeepSpeed configs rendered from the typed settings."""
    from infra.ds_config import REFERENCE_DIR, write_reference_configs

    for path in write_reference_configs(out or REFERENCE_DIR):
        console.print(f"wrote {path}")


@app.command("compile")
def compile_pipelines(out: str = typer.Option(".vlpipe/compiled", help="Output directory.")) -> None:
    """Compile the Kubeflow pipelines (arrives with the Pipelines issue)."""
    console.print("[yellow]vlpipe compile:[/yellow] no pipelines are defined yet (Pipelines issue #7).")
    raise typer.Exit(2)


@app.command("bench")
def bench(out: str = typer.Option(".vlpipe/bench", help="Where JSON results go.")) -> None:
    """Run the benchmarks that exist and write JSON results under `out`."""
    from pipelines.bench import run_benchmarks

    run_benchmarks(Path(out), console=console)


def _register_eval() -> None:
    from components.evaluate.cli import eval_command

    app.command("eval", help="Best-of-N evaluation with the PRM as critic (`--config FILE`).")(eval_command)


_register_eval()

if __name__ == "__main__":
    app()
