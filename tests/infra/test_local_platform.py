"""The local platform's bookkeeping, without servers: credentials drawn once and kept, private files, and the
check that a port is served by the platform's own process."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from vlpipe.infra import local_platform


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_are_drawn_once_private_and_reused(tmp_path):
    directory = tmp_path / "platform"
    local_platform._private_directory(directory)
    first, drawn = local_platform._credentials(directory)
    assert drawn
    path = directory / local_platform.CREDENTIALS_FILE
    assert _mode(path) == 0o600 and _mode(directory) == 0o700
    assert first["aws_access_key_id"].startswith("AKIA") and len(first["aws_access_key_id"]) == 20
    assert len(set(first.values())) == len(first)  # four independent secrets
    again, drawn = local_platform._credentials(directory)
    assert again == first and not drawn

    # A field missing (an older file) is drawn and added; the others stay.
    stored = json.loads(path.read_text())
    del stored["flask_secret_key"]
    path.write_text(json.dumps(stored))
    completed, drawn = local_platform._credentials(directory)
    assert not drawn and completed["mlflow_admin_password"] == first["mlflow_admin_password"]
    assert completed["flask_secret_key"] and json.loads(path.read_text()) == completed


def test_an_unreadable_credentials_file_stops_up_without_showing_its_content(tmp_path):
    directory = tmp_path / "platform"
    directory.mkdir()
    (directory / local_platform.CREDENTIALS_FILE).write_text('{"aws_secret_access_key": "sk-visible')
    with pytest.raises(local_platform.PlatformError) as caught:
        local_platform._credentials(directory)
    message = str(caught.value)
    assert "credentials.json is not a JSON object" in message and "sk-visible" not in message
    (directory / local_platform.CREDENTIALS_FILE).write_text('["sk-visible"]')
    with pytest.raises(local_platform.PlatformError, match="not a JSON object"):
        local_platform._credentials(directory)


def test_private_files_are_created_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)  # the most permissive umask: the mode has to come from the create call itself
    try:
        local_platform._write_private(tmp_path / "env", "export A=1\n")
        local_platform._write_private(tmp_path / "env", "export A=2\n")  # replaced, still private
    finally:
        os.umask(old)
    assert _mode(tmp_path / "env") == 0o600 and (tmp_path / "env").read_text() == "export A=2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]  # no temporary file left


def test_up_tightens_credential_files_an_older_version_left_readable(tmp_path):
    directory = tmp_path / "platform"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    for name in ("auth.db", "auth.db-journal", "basic_auth.ini", "env", "mlflow.db"):
        (directory / name).write_text("x")
        os.chmod(directory / name, 0o644)
    (directory / "mlflow.log").write_text("x")
    os.chmod(directory / "mlflow.log", 0o644)
    local_platform._private_directory(directory)
    assert _mode(directory) == 0o700
    for name in ("auth.db", "auth.db-journal", "basic_auth.ini", "env", "mlflow.db"):
        assert _mode(directory / name) == 0o600, name


def test_down_keeps_the_credentials_and_purge_deletes_them(tmp_path):
    directory = local_platform.platform_dir(tmp_path)
    local_platform._private_directory(directory)
    credentials, _ = local_platform._credentials(directory)
    (directory / local_platform.ENV_FILE).write_text("export A=1\n")
    (directory / local_platform.STATE_FILE).write_text('{"s3_port": 1, "mlflow_port": 2, "pids": {}}')
    assert local_platform.down(tmp_path) == []
    assert not (directory / local_platform.ENV_FILE).exists()
    assert local_platform._credentials(directory) == (credentials, False)
    local_platform.down(tmp_path, purge=True)
    assert not directory.exists()


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc (Linux)")
def test_a_port_counts_as_the_platforms_only_when_its_process_group_listens(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert local_platform._listener_in_group(port, os.getpgrp()) is False  # bound, not listening
        listener.listen()
        assert local_platform._listener_in_group(port, os.getpgrp()) is True
        # Another process group (one that holds no socket on the port) does not own it.
        assert local_platform._listener_in_group(port, os.getpgrp() + 1_000_000) is False


@pytest.mark.slow  # imports MLflow's server (~3 s) and hashes passwords
def test_an_auth_db_whose_password_was_lost_gets_the_new_one(tmp_path):
    """An older version drew a new admin password at every `up` and kept none: the first `up` with
    credentials.json sets the admin's password in the existing auth.db to the one it drew."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    auth_db = tmp_path / "auth.db"
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{auth_db}")
    store.create_user(local_platform.ADMIN_USERNAME, "the-lost-password-1", is_admin=True)
    store.engine.dispose()

    local_platform._reset_admin_password(auth_db, "the-new-password-22")
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{auth_db}")
    try:
        assert store.authenticate_user(local_platform.ADMIN_USERNAME, "the-new-password-22")
        assert not store.authenticate_user(local_platform.ADMIN_USERNAME, "the-lost-password-1")
        assert store.get_user(local_platform.ADMIN_USERNAME).is_admin
    finally:
        store.engine.dispose()
