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
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
deepspeed_app = typer.Typer(help="DeepSpeed configs.", no_args_is_help=True)
app.add_typer(deepspeed_app, name="deepspeed")
recipe_app = typer.Typer(
    help="Recipes: list the shipped ones, show one fully resolved.", no_args_is_help=True
)
app.add_typer(recipe_app, name="recipe")
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
    from vlpipe.model.build import meta_parameter_count
    from vlpipe.model.presets import get_preset

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
    from vlpipe.model.init import init_composed, init_random

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
                from vlpipe.model.data.demo import iter_demo_texts

                corpus = list(iter_demo_texts(data))
            path = init_random(preset, out, corpus=corpus, vocab_size=vocab_size, seed=seed)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {preset} checkpoint to {path}")


@model_app.command("check")
def model_check(
    directory: str = typer.Argument(..., help="Checkpoint directory (local or s3://)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Load a checkpoint the way runtimes do and report problems (vocabulary vs embeddings, EOS, tie flags,
    dtype, rope, chat template, processor config); exit 1 when there is one."""
    import json

    from vlpipe.model.check import check_checkpoint
    from vlpipe.model.storage import localize

    try:
        report = check_checkpoint(localize(directory))
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for key, value in report.facts.items():
            console.print(f"{key}: {value}")
        for code, message in report.problems:
            console.print(f"[red]{code}[/red]: {message}", highlight=False, soft_wrap=True)
        console.print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("demo")
def data_demo(
    out: str = typer.Option(..., help="Output directory (local or s3://bucket/prefix)."),
    seed: int = typer.Option(0, help="Generation seed."),
    size: str = typer.Option("default", help="default (the small-preset demo) or tiny (tests)."),
    overwrite: bool = typer.Option(False, help="Replace an existing non-empty output."),
) -> None:
    """Write the demo dataset (text corpus, captions, reasoning task, MPO pairs, PRM data)."""
    from vlpipe.model.data.demo import DemoSizes, write_demo_dataset

    sizes = DemoSizes.tiny() if size == "tiny" else DemoSizes()
    summary = write_demo_dataset(out, seed=seed, sizes=sizes, overwrite=overwrite)
    console.print_json(summary.model_dump_json())


@data_app.command("check")
def data_check(
    source: str = typer.Argument(..., help="A meta JSON (or a single JSONL), local or s3://."),
    mode: str = typer.Option(..., help="pretrain, sft (conversations), mpo (pairs) or prm (step records)."),
    checkpoint: str = typer.Option(None, help="Checkpoint directory whose tokenizer and tiling to use."),
    preset: str = typer.Option(None, help="Or a preset (stand-in tokenizer: approximate token counts)."),
    limit: int = typer.Option(None, help="Read at most this many records per dataset."),
    image_root: str = typer.Option(None, help="For a single JSONL: the directory its image paths are under."),
    json_out: Path = typer.Option(None, "--json", help="Also write the report to this JSON file."),
    samples: bool = typer.Option(False, help="Add one row per record (dataset, line, id, tokens, tiles)."),
    max_bad_fraction: float = typer.Option(0.05, help="Exit non-zero when more than this share is bad."),
) -> None:
    """Read every record as training would and report counts, reasons and distributions."""
    from vlpipe.components.data.check import check_conversations, check_records, vocabulary_from

    if mode not in ("pretrain", "sft", "mpo", "prm"):
        console.print(f"[red]error:[/red] --mode must be pretrain, sft, mpo or prm, not {mode!r}")
        raise typer.Exit(2)
    try:
        if mode in ("mpo", "prm"):
            report = check_records(source, mode, image_root=image_root)
        else:
            vocab = vocabulary_from(checkpoint, preset)
            report = check_conversations(
                source, mode, vocab, limit=limit, samples=samples, image_root=image_root, progress=True
            )
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_data_report(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_out}")
    if report["bad_fraction"] > max_bad_fraction:
        console.print(
            f"[red]{report['bad_fraction']:.1%} of the records are bad, above --max-bad-fraction "
            f"{max_bad_fraction:.1%}[/red]"
        )
        raise typer.Exit(1)


def _print_data_report(report: dict) -> None:
    table = Table(title=f"{report['source']} ({report['mode']})")
    columns = (
        "dataset",
        "records",
        "usable",
        "bad",
        "tokens p50/p95/max",
        "tiles/image p50/max",
        "frames p50/max",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "dataset" else "right", no_wrap=True)
    for name, d in report.get("datasets", {}).items():
        tokens, tiles, frames = (
            d.get("tokens", {}),
            d.get("tiles_per_image", {}),
            d.get("frames_per_video", {}),
        )
        table.add_row(
            name,
            str(d["records"]),
            str(d["usable"]),
            str(d["quarantined"]),
            f"{tokens.get('p50', '-')}/{tokens.get('p95', '-')}/{tokens.get('max', '-')}",
            f"{tiles.get('p50', '-')}/{tiles.get('max', '-')}",
            f"{frames.get('p50', '-')}/{frames.get('max', '-')}",
        )
    console.print(table)
    for name, d in report.get("datasets", {}).items():
        for reason, slot in d.get("reasons", {}).items():
            first = slot["examples"][0]
            console.print(
                f"  {name}/{reason}: {slot['count']} (e.g. line {first['line']}: {first['detail']})"
            )
    if "mixture" in report:
        mix = report["mixture"]
        console.print(
            f"mixture: ~{mix['estimated_epoch_tokens']} tokens per epoch, language share {mix['language_share']}"
            f" (language:multimodal {mix['language_to_multimodal']})"
        )
    if "error" in report:
        console.print(f"[red]{report['error']}[/red]")


@app.command("train", context_settings={"allow_extra_args": False})
def train(
    stage: str = typer.Argument(..., help="A training stage of the stage table: pretrain, sft, mpo or prm."),
    config: Path = typer.Option(..., "--config", "-c", help="Stage config (YAML or JSON)."),
    summary: Path | None = typer.Option(None, help="Write the stage summary JSON here."),
) -> None:
    """Train one stage from a config file (also under `torchrun` / `deepspeed` launchers)."""
    from pydantic import ValidationError

    from vlpipe.components.stages import TRAIN_COMMANDS, load_stage_config

    if stage not in TRAIN_COMMANDS:
        raise typer.BadParameter(f"choose one of {', '.join(TRAIN_COMMANDS)}", param_hint="STAGE")
    try:
        cfg = load_stage_config(config, stage)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]invalid config {config}:[/red] {exc}")
        raise typer.Exit(2) from exc
    from vlpipe.components.training.entrypoint import train as train_stage

    result = train_stage(stage, cfg, summary)
    console.print_json(json.dumps(result, default=str))


@deepspeed_app.command("render")
def deepspeed_render(
    out: Path = typer.Option(None, help="Directory (default: the package's infra/deepspeed/)."),
) -> None:
    """Write the reference DeepSpeed configs rendered from the typed settings."""
    from vlpipe.components.training.deepspeed import REFERENCE_DIR, write_reference_configs

    for path in write_reference_configs(out or REFERENCE_DIR):
        console.print(f"wrote {path}")


def _recipe(name: str, overrides: list[str] | None = None):
    """Load and validate a recipe (its `base` chain and `--set` overrides applied), turning its errors into a
    clean CLI error (exit code 2)."""
    from vlpipe.pipelines.config import load_recipe

    try:
        return load_recipe(name, overrides or [])
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]invalid recipe {name}:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc


SET_HELP = "Override a recipe setting: KEY=VALUE with a dotted key, e.g. stages.sft.config.trainer.optimizer.lr=1e-5 (repeatable; the value is YAML)."


def _parameters(values: list[str]) -> dict[str, str]:
    params = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--param")
        params[key] = val
    return params


@app.command("compile")
def compile_pipelines(
    recipe: str = typer.Option(None, help="Recipe name or YAML file; default: every shipped recipe."),
    out: Path = typer.Option(Path(".vlpipe/compiled"), help="Output directory."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Compile the Kubeflow pipelines to IR YAML, one file per pipeline: `<pipeline>-<version>.yaml`.

    With --recipe the files go to OUT; without, each shipped recipe's go to OUT/<recipe>/.
    """
    from vlpipe.pipelines.compile import compile_recipe
    from vlpipe.pipelines.config import list_recipes

    names = [recipe] if recipe else list_recipes()
    for name in names:
        config = _recipe(name, set_)
        for path in compile_recipe(config, out if recipe else out / config.name).values():
            console.print(f"wrote {path}")


@app.command("submit")
def submit(
    host: str = typer.Option(
        ..., help="Kubeflow Pipelines API endpoint (credentials: kube config/env only)."
    ),
    recipe: str = typer.Option(..., help="Recipe name or YAML file."),
    experiment: str = typer.Option(None, help="Kubeflow experiment (default: the recipe's experiment)."),
    pipeline: str = typer.Option(
        "internvl3-recipe", help="internvl3-recipe, sft-mpo, evaluate or promote-deploy."
    ),
    param: list[str] = typer.Option([], help="Pipeline parameter NAME=VALUE (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Run every task again (no reuse of cached results)."
    ),
) -> None:
    """Upload the pipeline (or a new version of it) and start a run on Kubeflow Pipelines."""
    from vlpipe.pipelines.submit import submit_recipe

    result = submit_recipe(
        _recipe(recipe, set_),
        host=host,
        pipeline=pipeline,
        experiment=experiment,
        arguments=_parameters(param),
        cache=not no_cache,
    )
    console.print(
        f"{'uploaded' if result.uploaded else 'reused'} {result.pipeline_name} version "
        f"{result.version_name}; started run {result.run_id} in experiment {result.experiment}",
        soft_wrap=True,
    )


@app.command("run")
def run(
    local_run: bool = typer.Option(False, "--local", help="Run with kfp.local (the only mode here)."),
    recipe: str = typer.Option("tiny", help="Recipe name or YAML file."),
    pipeline: str = typer.Option(
        "internvl3-recipe", help="internvl3-recipe, sft-mpo, evaluate or promote-deploy."
    ),
    param: list[str] = typer.Option([], help="Pipeline parameter NAME=VALUE (repeatable)."),
    summary_json: Path = typer.Option(None, "--summary-json", help="Also write the summary as JSON here."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Run every task again (no reuse of cached results)."
    ),
) -> None:
    """Run a pipeline locally with kfp.local (subprocesses, no containers) and print its summary."""
    if not local_run:
        console.print("[red]only --local runs here;[/red] use `vlpipe submit --host URL` for a cluster")
        raise typer.Exit(2)
    from vlpipe.pipelines.local import run_local
    from vlpipe.pipelines.summary import print_summary

    config = _recipe(recipe, set_)
    try:
        result = run_local(config, pipeline=pipeline, arguments=_parameters(param), cache=not no_cache)
    except ValueError as exc:  # an unknown pipeline or parameter, or a value of the wrong type
        console.print(f"[red]invalid --param:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    except RuntimeError as exc:
        console.print(f"[red]pipeline failed:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    wide = Console(width=max(console.width, 120))  # the summary tables are wider than a pipe's 80 columns
    print_summary(result, wide, tracking_uri=result["tracking_uri"], seconds=result["seconds"])


@recipe_app.command("show")
def recipe_show(
    recipe: str = typer.Argument(..., help="Recipe name or YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print the fully resolved, validated recipe (base chain merged, overrides applied, defaults filled) as YAML."""
    import yaml

    config = _recipe(recipe, set_)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, width=110), end="")


@recipe_app.command("list")
def recipe_list() -> None:
    """The shipped recipes."""
    from vlpipe.pipelines.config import list_recipes

    for name in list_recipes():
        print(name)


trainjob_app = typer.Typer(help="Kubeflow Trainer TrainJobs of multi-node stages.", no_args_is_help=True)
app.add_typer(trainjob_app, name="trainjob")


@trainjob_app.command("render")
def trainjob_render(
    recipe: str = typer.Option(..., help="Recipe name or YAML file."),
    stage: str = typer.Option(..., help="A training stage: pretrain, sft, mpo, critic or prm."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    namespace: str = typer.Option("vlpipe", help="The TrainJob's namespace (the pipeline's)."),
    run_key: str = typer.Option("manual", help="The pipeline run it belongs to (names it and its work dir)."),
) -> None:
    """Print, as YAML, the TrainJob the stage's step would create (also for a one-node stage, to review)."""
    import yaml

    from vlpipe.components.stages import STAGES
    from vlpipe.components.training.task import stage_work_dir
    from vlpipe.components.training.trainjob import render_stage_trainjob

    config = _recipe(recipe, set_)
    if stage not in config.trained_stages:
        raise typer.BadParameter(
            f"{config.name} trains {', '.join(config.trained_stages)}", param_hint="--stage"
        )
    try:
        launch = config.trainjob_launch(stage)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    entry = STAGES[stage]
    manifest = render_stage_trainjob(
        launch,
        stage=entry.trains_as or stage,
        task=entry.task,
        run_key=run_key,
        namespace=namespace,
        work_dir=stage_work_dir(launch.work_volume.mount_path, run_key, stage),
    )
    print(yaml.safe_dump(manifest, sort_keys=False, width=110), end="")


@app.command("bench")
def bench(out: str = typer.Option(".vlpipe/bench", help="Where JSON results go.")) -> None:
    """Run the benchmarks that exist and write JSON results under `out`."""
    from vlpipe.pipelines.bench import run_benchmarks

    run_benchmarks(Path(out), console=console)


@app.command("gpu-check")
def gpu_check(
    out: str = typer.Option(".vlpipe/gpu-check", help="Where report.json goes."),
    reduced: bool = typer.Option(False, help="The CPU form (tiny, fp32, SDPA, gloo) even on a GPU."),
    preset: str | None = typer.Option(None, help="Model preset (default: 1b on a GPU, tiny on a CPU)."),
    peak_tflops: float | None = typer.Option(
        None, help="Dense bf16 peak TFLOP/s for MFU (default: the GPU's)."
    ),
) -> None:
    """Packed = per-sample logits (SDPA, flash-attention), a training step (tokens/s, MFU, peak memory) and a
    2-process all-reduce, fully on a GPU or reduced on a CPU; exit 1 when a check failed (skipped is not)."""
    from vlpipe.components.training.gpu_check import finish, run_checks

    report = run_checks(reduced=reduced, preset=preset, peak_tflops=peak_tflops)
    raise typer.Exit(finish(report, Path(out)))


def _register_stage_commands() -> None:
    """Commands whose functions live beside their stage (imports there are light; heavy ones run inside)."""
    from vlpipe.components.evaluate.cli import eval_command
    from vlpipe.components.prm_data.cli import prm_data_command
    from vlpipe.serving.cli import serve_command
    from vlpipe.serving.registry_cli import compare_command, promote_command, rollback_command

    app.command("eval", help="Best-of-N evaluation with the PRM as judge (`--config FILE`).")(eval_command)
    app.command(
        "prm-data", help="On-policy PRM data: sample the policy, label every step (`--config FILE`)."
    )(prm_data_command)
    app.command("serve", help="Serve a checkpoint or MLflow model with KServe (V1, V2, OpenAI chat).")(
        serve_command
    )
    app.command("promote")(promote_command)
    app.command("rollback")(rollback_command)
    app.command("compare")(compare_command)
    from vlpipe.infra.cli import platform_app

    app.add_typer(platform_app, name="platform")


_register_stage_commands()

if __name__ == "__main__":
    app()
