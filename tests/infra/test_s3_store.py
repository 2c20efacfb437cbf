"""The local platform's S3 store (`infra/s3_store.py`): only the platform's key gets in, and what it wrote
survives a restart, including a SIGKILL right after the write was acknowledged.

Each test runs the store as its own process on a port it picks itself (127.0.0.1), with its data in the
test's temporary directory, so it cannot meet another platform running on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

ACCESS_KEY_ID = "AKIATESTSTORE0000001"
SECRET_ACCESS_KEY = "store-test-secret-0123456789"


class Store:
    """A running `python -m vlpipe.infra.s3_store` process."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        port_file = data_dir.parent / "s3.port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(VLPIPE_S3_ACCESS_KEY_ID=ACCESS_KEY_ID, VLPIPE_S3_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vlpipe.infra.s3_store", "--data-dir", str(data_dir)]
                + ["--port-file", str(port_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert self.process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the S3 store did not start within 60 s"
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{port_file.read_text()}"

    def client(self, key: str = ACCESS_KEY_ID, secret: str = SECRET_ACCESS_KEY, **config: str):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, **config),
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        return self.process.wait(timeout=30)


@pytest.fixture()
def store_dir(tmp_path):
    return tmp_path / "s3"


@pytest.fixture()
def store(store_dir, tmp_path):
    running = Store(store_dir, tmp_path / "s3.log")
    yield running
    running.stop(signal.SIGKILL)


def _code(call) -> tuple[str, int]:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.response["Error"]["Code"], caught.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_only_the_platform_key_gets_in(store):
    s3 = store.client()
    s3.create_bucket(Bucket="bucket-a")
    s3.put_object(Bucket="bucket-a", Key="k.txt", Body=b"secret data")

    unknown = store.client(key="AKIAUNKNOWN000000000", secret=SECRET_ACCESS_KEY)
    assert _code(lambda: unknown.get_object(Bucket="bucket-a", Key="k.txt")) == ("InvalidAccessKeyId", 403)
    assert _code(lambda: unknown.put_object(Bucket="bucket-a", Key="x", Body=b"x")) == (
        "InvalidAccessKeyId",
        403,
    )
    assert _code(lambda: unknown.list_buckets()) == ("InvalidAccessKeyId", 403)
    wrong_secret = store.client(secret="not-the-secret")
    assert _code(lambda: wrong_secret.get_object(Bucket="bucket-a", Key="k.txt")) == (
        "SignatureDoesNotMatch",
        403,
    )

    # Unsigned requests, and moto's control API (reset, auth switch, state dump), are refused.
    assert httpx.get(f"{store.endpoint}/bucket-a/k.txt").status_code == 403
    assert httpx.put(f"{store.endpoint}/bucket-a/new", content=b"x").status_code == 403
    assert httpx.get(f"{store.endpoint}/moto-api/data.json").status_code == 404
    assert httpx.post(f"{store.endpoint}/moto-api/reset-auth", content=b"inf").status_code == 404
    assert httpx.post(f"{store.endpoint}/moto-api/reset").status_code == 404
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="bucket-a")["Contents"]] == ["k.txt"]


def test_presigned_urls_are_checked(store):
    s3 = store.client(signature_version="s3v4")
    s3.create_bucket(Bucket="bucket-p")
    key = "dir with space/ü+x;y.txt"  # characters a client may escape in more than one way
    s3.put_object(Bucket="bucket-p", Key=key, Body=b"odd name")
    params = {"Bucket": "bucket-p", "Key": key, "ResponseContentDisposition": 'attachment; filename="y.txt"'}
    url = s3.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"odd name"
    tampered = httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
    assert tampered.status_code == 403 and "SignatureDoesNotMatch" in tampered.text
    other_key = store.client(key="AKIAUNKNOWN000000000", signature_version="s3v4")
    refused = httpx.get(other_key.generate_presigned_url("get_object", Params=params))
    assert refused.status_code == 403 and "InvalidAccessKeyId" in refused.text
    expired = s3.generate_presigned_url("get_object", Params=params, ExpiresIn=1)
    time.sleep(2)
    assert httpx.get(expired).status_code == 403

    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": "bucket-p", "Key": "up.txt"}, ExpiresIn=60
    )
    assert httpx.put(put_url, content=b"via presigned PUT").status_code == 200
    assert s3.get_object(Bucket="bucket-p", Key="up.txt")["Body"].read() == b"via presigned PUT"


def test_acknowledged_writes_survive_a_sigkill(store_dir, tmp_path):
    store = Store(store_dir, tmp_path / "s3.log")
    s3 = store.client()
    s3.create_bucket(Bucket="bucket-k")
    s3.put_object(
        Bucket="bucket-k", Key="a.txt", Body=b"first", ContentType="text/plain", Metadata={"m": "1"}
    )
    s3.put_object(
        Bucket="bucket-k", Key="a.txt", Body=b"second", ContentType="text/plain", Metadata={"m": "2"}
    )
    s3.put_object(Bucket="bucket-k", Key="gone.txt", Body=b"deleted below")
    s3.delete_object(Bucket="bucket-k", Key="gone.txt")
    big = os.urandom(6 * 1024 * 1024 + 5)  # a multipart upload: two parts of >= 5 MiB
    upload = s3.create_multipart_upload(Bucket="bucket-k", Key="big.bin")["UploadId"]
    parts = [
        {"PartNumber": n, "ETag": s3.upload_part(Bucket="bucket-k", Key="big.bin", UploadId=upload,
                                                  PartNumber=n, Body=chunk)["ETag"]}
        for n, chunk in ((1, big[: 5 * 1024 * 1024]), (2, big[5 * 1024 * 1024 :]))
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket="bucket-k", Key="big.bin", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    s3.copy_object(Bucket="bucket-k", Key="copy.txt", CopySource={"Bucket": "bucket-k", "Key": "a.txt"})
    before = {k: s3.head_object(Bucket="bucket-k", Key=k) for k in ("a.txt", "big.bin", "copy.txt")}
    assert store.stop(signal.SIGKILL) == -signal.SIGKILL  # no chance to save anything on the way out

    for path in [store_dir / "manifest.json", *(store_dir / "objects").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert len(list((store_dir / "objects").iterdir())) == 3  # replaced and deleted objects' files are gone

    store = Store(store_dir, tmp_path / "s3.log")
    try:
        s3 = store.client()
        assert [o["Key"] for o in s3.list_objects_v2(Bucket="bucket-k")["Contents"]] == [
            "a.txt",
            "big.bin",
            "copy.txt",
        ]
        a = s3.get_object(Bucket="bucket-k", Key="a.txt")
        assert (
            a["Body"].read() == b"second" and a["ContentType"] == "text/plain" and a["Metadata"] == {"m": "2"}
        )
        assert s3.get_object(Bucket="bucket-k", Key="big.bin")["Body"].read() == big
        for key, head in before.items():
            after = s3.head_object(Bucket="bucket-k", Key=key)
            assert (after["ETag"], after["LastModified"]) == (head["ETag"], head["LastModified"]), key
        # Still only the platform's key after a restart.
        unknown = store.client(key="AKIAUNKNOWN000000000")
        assert _code(lambda: unknown.get_object(Bucket="bucket-k", Key="a.txt")) == (
            "InvalidAccessKeyId",
            403,
        )
    finally:
        assert store.stop(signal.SIGTERM) == 0  # a clean stop


def test_the_key_is_never_on_the_command_line_or_in_the_log(store, tmp_path):
    s3 = store.client(signature_version="s3v4")
    s3.create_bucket(Bucket="bucket-l")
    s3.put_object(Bucket="bucket-l", Key="k", Body=b"x")
    httpx.get(s3.generate_presigned_url("get_object", Params={"Bucket": "bucket-l", "Key": "k"}))
    cmdline = Path(f"/proc/{store.process.pid}/cmdline").read_bytes().decode()
    log = (tmp_path / "s3.log").read_text()
    assert '"GET /bucket-l/k" 200' in log  # requests are logged, without their query string
    for text in (cmdline, log):
        assert ACCESS_KEY_ID not in text and SECRET_ACCESS_KEY not in text


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "is not a store manifest"),
        (
            '{"buckets": {"bkt": {"region": "us-east-1", "objects": {"k": {"file": "../../etc/passwd"}}}}}',
            "has an entry of the wrong shape",
        ),
    ],
)
def test_a_bad_manifest_stops_the_start_with_its_path(store_dir, tmp_path, manifest, message):
    store_dir.mkdir()
    (store_dir / "manifest.json").write_text(manifest)
    port_file = tmp_path / "s3.port"
    env = {
        **os.environ,
        "VLPIPE_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "VLPIPE_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlpipe.infra.s3_store",
            "--data-dir",
            str(store_dir),
            "--port-file",
            str(port_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and f"manifest.json {message}" in result.stderr
    assert "Traceback" not in result.stderr and not port_file.exists()
