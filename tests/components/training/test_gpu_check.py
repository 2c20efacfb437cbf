"""`make gpu-check` in its reduced form (CPU: tiny, fp32, SDPA, gloo), run as the device runs it (`python -m`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlpipe.components.training.gpu_check import FAILED, PASSED, SKIPPED, finish, result

# What a bare GPU machine does not have; none of it may load on the gpu-check path (psutil may: transformers
# imports it when it is installed and does without it otherwise).
HEAVY = ("mlflow", "kfp", "deepspeed", "boto3", "botocore", "s3fs", "kserve", "fastapi", "uvicorn")


@pytest.mark.slow
def test_reduced_form_runs_and_reports(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vlpipe.components.training.gpu_check", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "packed-logits/sdpa" in proc.stdout and "report:" in proc.stdout  # the printed table

    # -X importtime lists every module imported, by this process and by the spawned all-reduce workers.
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not {name.split(".")[0] for name in imported} & set(HEAVY)

    report = json.loads((out / "report.json").read_text())
    assert report["form"] == "reduced" and report["preset"] == "tiny" and report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert {name: c["status"] for name, c in checks.items()} == {
        "packed-logits/sdpa": PASSED,
        "packed-logits/flash_attention_2": SKIPPED,  # never "passed" without the package
        "train-step": PASSED,
        "all-reduce/gloo": PASSED,
    }
    assert checks["packed-logits/flash_attention_2"]["reason"] == "flash_attn not installed"
    logits = checks["packed-logits/sdpa"]["metrics"]
    assert logits["dtype"] == "float32" and logits["max_abs_diff"] <= logits["tolerance"] < 1e-3
    assert logits["leak_max_abs_diff"] > 10 * logits["tolerance"]  # the comparison can see a leak
    step = checks["train-step"]["metrics"]
    assert "mfu" not in step and "peak_memory_gib" not in step  # CPU: no MFU, no CUDA memory
    assert step["preset"] == "tiny" and step["tokens_per_s"] > 0 and len(step["loss"]) == 2
    assert checks["all-reduce/gloo"]["metrics"]["world_size"] == 2


def test_exit_status_counts_failures_not_skips(tmp_path, capsys):
    skipped = {
        "form": "full", "preset": "1b", "device": "GPU", "versions": {"torch": "x"}, "seconds": 1.0, "ok": True,
        "checks": [result("a", PASSED, "fine", tokens_per_s=10.0, mfu=0.4), result("b", SKIPPED, "one GPU")],
    }  # fmt: skip
    assert finish(skipped, tmp_path) == 0
    assert "mfu=40.0%" in capsys.readouterr().out
    failed = dict(skipped, checks=[*skipped["checks"], result("c", FAILED, "NaN loss")])
    assert finish(failed, tmp_path) == 1
    assert json.loads((tmp_path / "report.json").read_text())["checks"][2]["status"] == FAILED
