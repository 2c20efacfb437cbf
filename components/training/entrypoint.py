"""Run a training stage from a config file: `vlpipe train STAGE --config FILE` or
`python -m vlpipe.components.training STAGE --config FILE` (works under `torchrun` and `deepspeed`).

validate (before any heavy import) → run the stage's `main` (the stage table's entry) → write the summary JSON
(rank 0) → tear down the process group.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from vlpipe.components.stages import STAGES, TRAIN_COMMANDS, load_stage_config

COMPLETE_FILE = "complete.json"


def run_stage(stage: str, config: Any) -> dict[str, Any]:
    """Run `stage` with a validated config; returns the stage's summary.

    Idempotent: a stage whose work dir records a completed run of the same config returns that run's
    summary without training again (a retried pipeline task costs nothing). A completed run of a
    different config in the same work dir is an error.

    Raises:
        ValueError: when `work_dir` holds a completed run of another config.
    """
    done = Path(config.resolved_work_dir) / COMPLETE_FILE
    wanted = config.model_dump(mode="json")
    if done.exists():
        previous = json.loads(done.read_text())
        if previous["config"] == wanted:
            logging.getLogger(__name__).info(
                "%s already complete in %s; not training again", stage, done.parent
            )
            return previous["summary"]
        raise ValueError(
            f"{done.parent} holds a completed {previous['config'].get('stage')} run of another config; "
            "use a new work_dir (or output) for a new run"
        )
    main = STAGES[stage].load_entry()
    try:
        summary = main(config)
        if int(os.environ.get("RANK", "0")) == 0:
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": wanted, "summary": summary}, indent=2, default=str))
            tmp.replace(done)
        return summary
    finally:
        import torch.distributed as dist

        if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=TRAIN_COMMANDS)
    parser.add_argument("--config", required=True, type=Path, help="stage config (YAML or JSON)")
    parser.add_argument("--summary", type=Path, help="write the stage summary JSON here (rank 0)")
    # The `deepspeed` launcher passes --local_rank; LOCAL_RANK in the environment is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(args.stage, load_stage_config(args.config, args.stage), args.summary)
    return 0


def train(stage: str, config: Any, summary_file: Path | None = None) -> dict[str, Any]:
    """`run_stage`, then the summary JSON written to `summary_file` on rank 0; returns the summary."""
    summary = run_stage(stage, config)
    if summary_file is not None and int(os.environ.get("RANK", "0")) == 0:
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
    return summary
