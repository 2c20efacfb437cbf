"""Security defaults: no credential in the repository, the serving limits on by default, the local platform's
credentials kept out of sight. (Manifests: tests/infra; compiled pipelines and recipes: tests/pipelines.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Shapes of real credentials: AWS access key ids, private keys, tokens in URLs, assignments of literal
# passwords/secrets (a value that is not a placeholder, an environment lookup or a variable).
CREDENTIAL_PATTERNS = {
    "aws_access_key_id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private_key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "url_userinfo": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"$]{3,}@[\w.-]+", re.IGNORECASE),
    "literal_secret": re.compile(
        r"""(?ix)\b(password|passwd|secret_access_key|secret_key|api_key|token)\b\s*[:=]\s*
        ["']?(?!\$\{|\$\(|<|CHANGE|REPLACE|\{\{)[A-Za-z0-9+/_\-]{8,}["']?\s*$"""
    ),
}


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.splitlines() if not p.startswith("tests/")]


def _scan(text: str) -> list[tuple[str, str]]:
    return [
        (name, line.strip())
        for line in text.splitlines()
        for name, p in CREDENTIAL_PATTERNS.items()
        if p.search(line)
    ]


def test_the_scanner_finds_credentials():
    planted = "\n".join(
        [
            "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
            "-----BEGIN RSA PRIVATE KEY-----",
            "uri = 'http://admin:hunter22@mlflow:5000'",
            "password: s3cr3tpassw0rd",
        ]
    )
    assert sorted(name for name, _ in _scan(planted)) == sorted(CREDENTIAL_PATTERNS)
    harmless = "\n".join(
        [
            "password: ${MLFLOW_ADMIN_PASSWORD}",
            'password = os.environ["MLFLOW_TRACKING_PASSWORD"]',
            "secret_key = secrets.token_urlsafe(24)",
            "token: CHANGE_ME",
        ]
    )
    assert _scan(harmless) == []


def test_no_credential_in_any_tracked_file_outside_the_tests():
    found = []
    for path in _tracked_files():
        if not path.is_file() or path.suffix in {".png", ".jpg", ".safetensors"}:
            continue
        found += [
            (str(path.relative_to(REPO)), name, line) for name, line in _scan(path.read_text(errors="ignore"))
        ]
    assert found == []


def test_serving_limits_are_on_without_configuration():
    from vlpipe.serving.limits import ServingLimits
    from vlpipe.serving.predictor import VLPipeModel

    limits = ServingLimits()
    values = limits.model_dump()
    assert values and all(isinstance(v, int | float) and 0 < v < 1e12 for v in values.values()), values
    assert limits.max_body_bytes <= 64 * 1024 * 1024
    # Slow clients cannot hold connections for long.
    assert limits.header_timeout_s <= 30 and limits.body_timeout_s <= 120
    assert limits.max_image_pixels <= 50_000_000  # decompression bombs refused before decoding
    assert VLPipeModel("m", "/nowhere").limits == limits  # what `vlpipe serve` uses


def test_the_local_platform_masks_credentials_and_writes_them_only_to_a_private_file(tmp_path, monkeypatch):
    from vlpipe.infra import local_platform

    directory = local_platform.platform_dir(tmp_path)
    platform = local_platform.Platform(
        directory=directory,
        s3_port=1,
        mlflow_port=2,
        pids={},
        env={
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:2",
            "MLFLOW_TRACKING_PASSWORD": "pw-123456789",
            "AWS_SECRET_ACCESS_KEY": "sk-123456789",
            "AWS_ACCESS_KEY_ID": "ak-123456789",
        },
    )
    assert platform.tracking_uri == "http://127.0.0.1:2" and local_platform.HOST == "127.0.0.1"
    exports = platform.export_lines()
    assert "export MLFLOW_TRACKING_PASSWORD=pw-123456789\n" in exports
    directory.mkdir(parents=True)
    (directory / local_platform.ENV_FILE).write_text(exports)
    (directory / local_platform.STATE_FILE).write_text('{"s3_port": 1, "mlflow_port": 2, "pids": {}}')
    loaded = local_platform.load(tmp_path)
    assert loaded is not None and loaded.env == platform.env
    status = local_platform.status(tmp_path)
    assert status["running"] is True
    text = str(status)
    assert "pw-123456789" not in text and "sk-123456789" not in text and "ak-123456789" not in text
    assert status["env"]["MLFLOW_TRACKING_PASSWORD"] == "***"


@pytest.mark.slow
def test_platform_up_and_down(tmp_path):
    """The real servers: loopback only, auth on, a private env file, buckets, and a clean stop."""
    import os

    import boto3
    import httpx

    from vlpipe.infra import local_platform

    platform = local_platform.up(tmp_path)
    try:
        env_file = platform.directory / local_platform.ENV_FILE
        assert env_file.stat().st_mode & 0o777 == 0o600
        for pid in platform.pids.values():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"127.0.0.1" in cmdline and b"0.0.0.0" not in cmdline
        assert httpx.get(f"{platform.tracking_uri}/api/2.0/mlflow/experiments/search").status_code == 401
        ok = httpx.get(
            f"{platform.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
            auth=(platform.env["MLFLOW_TRACKING_USERNAME"], platform.env["MLFLOW_TRACKING_PASSWORD"]),
        )
        assert ok.status_code == 200
        s3 = boto3.client(
            "s3",
            endpoint_url=platform.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=platform.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=platform.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} >= set(local_platform.BUCKETS)
        assert local_platform.up(tmp_path).pids == platform.pids  # already running: the same servers
    finally:
        stopped = local_platform.down(tmp_path)
    assert sorted(stopped) == ["mlflow", "moto"]
    assert not any(
        os.path.exists(f"/proc/{pid}") and local_platform._alive(pid) for pid in platform.pids.values()
    )
    assert local_platform.load(tmp_path) is None
    assert not (platform.directory / local_platform.ENV_FILE).exists()
