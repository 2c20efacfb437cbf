"""Stage configs validate early with clear messages; the LR schedule and DeepSpeed configs are as specified."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from vlpipe.components.stages import load_stage_config, parse_stage_config
from vlpipe.components.training.config import OptimizerConfig, SFTStageConfig, TrainerConfig
from vlpipe.components.training.deepspeed import (
    REFERENCE_DIR,
    dumps,
    reference_configs,
    render_deepspeed_config,
)
from vlpipe.components.training.runtime import lr_factor

SFT = {
    "stage": "sft",
    "init": "/ckpt/init",
    "output": "/ckpt/sft",
    "data": {"meta": "/data/meta.json"},
    "trainer": {"max_steps": 10},
}


def test_parse_picks_the_stage_class_and_derives_accumulation():
    cfg = parse_stage_config(SFT)
    assert isinstance(cfg, SFTStageConfig)
    assert cfg.resolved_work_dir == "/ckpt/sft.work"
    trainer = TrainerConfig(global_batch_size=16, micro_batch_size=2, max_steps=1)
    assert trainer.accumulation_steps(world_size=4) == 2  # 16 / (2 x 4)
    with pytest.raises(ValueError, match="not divisible"):
        trainer.accumulation_steps(world_size=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainer": {"max_steps": 10, "lr": 1.0}}, "lr"),  # unknown key (it lives under optimizer)
        ({"trainer": {"max_steps": 10, "epochs": 1}}, "exactly one of max_steps and epochs"),
        ({"trainer": {}}, "exactly one of max_steps and epochs"),
        ({"trainer": {"max_steps": 1, "global_batch_size": 6, "micro_batch_size": 4}}, "multiple"),
        (
            {"trainer": {"max_steps": 1, "freeze": {"vision": True, "projector": True, "llm": True}}},
            "nothing",
        ),
        ({"trainer": {"max_steps": 1, "distributed": {"zero_stage": 4}}}, "zero_stage"),
        (
            {"trainer": {"max_steps": 1, "distributed": {"zero_stage": 0, "offload_optimizer": True}}},
            "zero_stage",
        ),
        ({"trainer": {"max_steps": 1, "optimizer": {"lr": -1}}}, "lr"),
        ({"data": {"meta": "/m.json", "mode": "pretrain"}}, "data.mode"),
        ({"output": "s3://bucket/sft"}, "work_dir is required"),
        ({"packing": {"max_tokens": 64, "max_tiles": 4, "rows_per_batch": 3}}, "micro_batch_size"),
    ],
)
def test_invalid_configs_fail_with_the_key(change, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        parse_stage_config({**SFT, **change})


def test_stage_mismatch_and_missing_stage(tmp_path):
    with pytest.raises(ValueError, match="not 'mpo'"):
        parse_stage_config(SFT, stage="mpo")
    with pytest.raises(ValueError, match="no 'stage' key"):
        parse_stage_config({k: v for k, v in SFT.items() if k != "stage"})
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(SFT))
    assert load_stage_config(path, "sft").trainer.max_steps == 10
    with pytest.raises(FileNotFoundError):
        load_stage_config(tmp_path / "missing.yaml")


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(warmup_steps=2, min_lr_ratio=0.0)
    got = [lr_factor(s, 6, cfg) for s in range(6)]
    want = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert got == pytest.approx(want)
    floor = OptimizerConfig(warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(10, 10, floor) == pytest.approx(0.1)  # ends at min_lr_ratio
    assert lr_factor(0, 10, floor) == pytest.approx(1.0)


def test_shipped_deepspeed_configs_are_the_rendering():
    for name, config in reference_configs().items():
        assert (REFERENCE_DIR / name).read_text() == dumps(config), (
            f"{name} drifted; run `vlpipe deepspeed render`"
        )
    stages = {
        json.loads((REFERENCE_DIR / f"zero{s}.json").read_text())["zero_optimization"]["stage"]
        for s in range(4)
    }
    assert stages == {0, 1, 2, 3}


def test_rendered_batch_keys():
    from vlpipe.components.training.config import DistributedConfig

    cfg = render_deepspeed_config(
        DistributedConfig(zero_stage=3),
        bf16=False,
        grad_clip=0.5,
        train_batch_size=16,
        micro_batch_size=2,
        accumulation_steps=4,
    )
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (
        16,
        2,
        4,
    )
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"] == {"enabled": False}
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
