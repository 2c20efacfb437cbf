"""A tiny demo dataset and a random tiny starting checkpoint, shared by the training-stage tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, Path]:
    from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
    from vlpipe.model.init import init_random

    root = tmp_path_factory.mktemp("train-ws")
    data = root / "data"
    write_demo_dataset(str(data), seed=0, sizes=DemoSizes.tiny())
    init = root / "init"
    init_random("tiny", str(init), corpus=list(iter_demo_texts(str(data))), seed=0)
    return {"root": root, "data": data, "init": init}


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    return uri


def child_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a stage run in a subprocess: no launcher variables leaked from this process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        VLPIPE_HOME=str(tmp_path / "home"),
        PYTHONHASHSEED="0",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def sft_config(ws: dict[str, Path], out: Path, **trainer) -> dict:
    """A small SFT config on the tiny demo data."""
    return {
        "stage": "sft",
        "init": str(ws["init"]),
        "output": str(out),
        "data": {
            "meta": str(ws["data"] / "meta_sft.json"),
            "mode": "sft",
            "max_length": 512,
            "mixture": {"language_ratio": 0, "multimodal_ratio": 1},
        },
        "packing": {"max_tokens": 512, "max_tiles": 32, "buffer_size": 8},
        "trainer": {
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "max_steps": 8,
            "optimizer": {"lr": 3e-3, "warmup_steps": 1},
            "distributed": {"zero_stage": 2},
            **trainer,
        },
        "tracking": {"experiment": "test", "log_model": False, "system_metrics": False},
    }


def mixed_pretrain_config(ws: dict[str, Path], out: Path, **trainer) -> dict:
    """Pre-training on text and image-text samples 1:1, one sample per micro-batch (no packing): a step's
    micro-batches (on one rank or spread over ranks) regularly mix a text-only sample with an image one."""
    cfg = sft_config(ws, out, global_batch_size=2, micro_batch_size=1, **trainer)
    cfg.pop("packing")
    cfg["stage"] = "pretrain"
    cfg["data"] = {
        "meta": str(ws["data"] / "meta_pretrain.json"),
        "mode": "pretrain",
        "max_length": 512,
        "mixture": {"language_ratio": 1, "multimodal_ratio": 1},
    }
    return cfg
