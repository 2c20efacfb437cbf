"""A real two-node run on one machine: two `torchrun --nnodes 2 --nproc-per-node 1` launchers meeting through
c10d rendezvous on 127.0.0.1, each with its own TMPDIR (its own "disk" for checkpoint staging).

- two nodes x 1 micro-batch = one process x 2 accumulation steps (the tolerance of the 2-rank test);
- a checkpoint directory the nodes do not share is refused by every rank at the first checkpoint;
- killing both nodes after a committed checkpoint and restarting both ends with the uninterrupted run's
  losses and weights (checkpoints on a directory both nodes see: a ReadWriteMany volume);
- the same after killing only the node that does not host the rendezvous store, with checkpoints in
  `s3://` (moto server): the survivor fails on its own (peer gone, or the short process-group timeout set
  here), both restart and resume from the newest committed step.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.components.training.conftest import child_env, sft_config
from vlpipe.components.training.loop import read_metrics
from vlpipe.components.training.shared_store import COMMIT_FILE, committed_steps
from vlpipe.components.training.state import list_checkpoints

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 300  # one whole run of a node (tiny model, 6 steps; the machine may be shared)
PG_TIMEOUT_S = 60  # the process-group timeout of these runs (a lone survivor gives up after this)
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base(workspace, out: Path) -> dict:
    # As in the 2-rank test: no packing, so each micro-batch is one sample and 1 rank x 2 accumulation steps
    # and 2 ranks x 1 see the same samples in each optimizer step.
    cfg = sft_config(workspace, out, max_steps=STEPS, global_batch_size=2, micro_batch_size=1)
    cfg.pop("packing")
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg))
    return path


class Nodes:
    """Two torchrun launchers (node 0 hosts the rendezvous store), each in its own process group."""

    def __init__(self, config: Path, tmp_path: Path, tag: str, cwd: list[Path] | None = None) -> None:
        port = _free_port()
        self.logs = [tmp_path / f"{tag}-node{i}.log" for i in range(2)]
        self.procs = []
        for node in range(2):
            disk = tmp_path / f"node{node}-disk"  # this node's local disk: checkpoint staging goes here
            disk.mkdir(exist_ok=True)
            env = child_env(tmp_path)
            env.update(TMPDIR=str(disk), VLPIPE_PROCESS_GROUP_TIMEOUT_S=str(PG_TIMEOUT_S))
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tag}",
                f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120", "--local-addr=127.0.0.1",
                "--max-restarts=0", "-m", "vlpipe.components.sft", "--config", str(config),
            ]  # fmt: skip
            with self.logs[node].open("w") as log:
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=cwd[node] if cwd else None,
                    )
                )

    def kill(self, node: int) -> None:
        """SIGKILL the node: its launcher and every worker (torchrun starts workers in sessions of their own,
        so killing the launcher's process group alone would leave them training)."""
        proc = self.procs[node]
        try:
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            for node in range(2):
                self.kill(node)

    def tail(self) -> str:
        return "\n".join(f"--- node {i}\n{p.read_text()[-3000:]}" for i, p in enumerate(self.logs))


def _run_two_nodes(config: Path, tmp_path: Path, tag: str) -> None:
    nodes = Nodes(config, tmp_path, tag)
    assert nodes.wait() == [0, 0], nodes.tail()


def _wait_for_commit(nodes: Nodes, committed, deadline_s: float = RUN_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and all(p.poll() is None for p in nodes.procs):
        steps = committed()
        if steps:
            return steps
        time.sleep(0.02)
    nodes.wait(timeout=1)
    pytest.fail(f"no checkpoint was committed before the nodes stopped\n{nodes.tail()}")


def _weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> dict[str, Path]:
    """One process (2 accumulation steps) and an uninterrupted two-node run of the same config."""
    tmp = tmp_path_factory.mktemp("two-nodes-ref")
    one = _base(workspace, tmp / "one")
    done = subprocess.run(
        [sys.executable, "-m", "vlpipe.components.sft", "--config", str(_write(one, tmp / "one.json"))],
        env=child_env(tmp),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    two = {**one, "output": str(tmp / "two")}
    _run_two_nodes(_write(two, tmp / "two.json"), tmp, "ref")
    return {"tmp": tmp, "one": tmp / "one", "two": tmp / "two"}


def test_two_nodes_match_one_process_with_two_accumulation_steps(reference):
    one_m, two_m = read_metrics(f"{reference['one']}.work"), read_metrics(f"{reference['two']}.work")
    assert [m["step"] for m in two_m] == list(range(1, STEPS + 1))
    for a, b in zip(one_m, two_m, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["tokens"] == a["tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert one_m[-1]["loss"] < one_m[0]["loss"]
    w1, w2 = _weights(reference["one"]), _weights(reference["two"])
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    summary = json.loads((Path(f"{reference['two']}.work") / "complete.json").read_text())
    assert summary["config"]["checkpoint"]["every_steps"] == 2
    # Checkpoints at steps 2 and 4 (not at the last step), both committed with a manifest of both ranks' files.
    saved = list_checkpoints(f"{reference['two']}.work")
    assert [p.name for p in saved] == ["step-00000002", "step-00000004"]
    marker = json.loads((saved[-1] / COMMIT_FILE).read_text())
    assert marker["step"] == 4
    assert {"rank-00000.pt", "rank-00001.pt", "trainer_state.json", "config.json"} <= set(marker["files"])
    assert marker["files"]["rank-00001.pt"] == (saved[-1] / "rank-00001.pt").stat().st_size


def _assert_resumed_like_reference(out: Path, reference: dict[str, Path], killed_at: int) -> None:
    summary = json.loads((Path(f"{out}.work") / "complete.json").read_text())["summary"]
    assert 2 <= summary["resumed_from_step"] < STEPS
    assert summary["resumed_from_step"] >= killed_at
    a, b = read_metrics(f"{reference['two']}.work"), read_metrics(f"{out}.work")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in b] == [m["loss"] for m in a]  # exact: same data, RNG, optimizer state
    wa, wb = _weights(reference["two"]), _weights(out)
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_both_nodes_killed_after_a_checkpoint_resume_to_the_same_weights(reference, workspace, tmp_path):
    out = tmp_path / "killed"
    config = _write({**_base(workspace, out)}, tmp_path / "killed.json")
    work = Path(f"{out}.work")
    nodes = Nodes(config, tmp_path, "kill-both")
    saved = _wait_for_commit(nodes, lambda: [int(p.name.split("-")[1]) for p in list_checkpoints(work)])
    nodes.kill(0)
    nodes.kill(1)
    assert not (work / "complete.json").exists(), "the run finished before it could be killed"
    assert max(saved) < STEPS

    _run_two_nodes(config, tmp_path, "restart")
    _assert_resumed_like_reference(out, reference, max(saved))


@pytest.fixture()
def bucket(s3_server) -> str:
    import s3fs

    s3fs.S3FileSystem(anon=False).mkdir("ckpt-bucket")
    return "s3://ckpt-bucket/sft/checkpoints"


def test_non_host_node_killed_resumes_from_s3_to_the_same_weights(reference, workspace, tmp_path, bucket):
    out = tmp_path / "s3run"
    cfg = _base(workspace, out)
    cfg["checkpoint"]["location"] = bucket
    config = _write(cfg, tmp_path / "s3run.json")
    nodes = Nodes(config, tmp_path, "kill-worker")
    saved = _wait_for_commit(nodes, lambda: committed_steps(bucket))
    nodes.kill(1)  # node 1 does not host the rendezvous store
    started = time.monotonic()
    survivor = nodes.procs[0].wait(timeout=PG_TIMEOUT_S + 60)
    assert survivor != 0, "the surviving node must fail, not finish the run alone"
    assert time.monotonic() - started < PG_TIMEOUT_S + 60
    assert not (Path(f"{out}.work") / "complete.json").exists()
    assert max(saved) < STEPS

    _run_two_nodes(config, tmp_path, "restart")
    _assert_resumed_like_reference(out, reference, max(saved))
    # The bucket holds committed steps only (2 kept), each with both ranks' files; the nodes' staging
    # directories are empty again.
    import s3fs

    assert committed_steps(bucket) == [2, 4]
    fs = s3fs.S3FileSystem(anon=False)
    marker = json.loads(fs.cat(f"{bucket}/step-00000004/{COMMIT_FILE}"))
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(marker["files"])
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(bucket, refresh=True)) == [
        "step-00000002",
        "step-00000004",
    ]
    for node in range(2):
        staged = tmp_path / f"node{node}-disk" / "vlpipe-checkpoints"
        assert staged.is_dir(), f"node {node} staged nothing on its own disk"
        assert [p for p in staged.rglob("*") if p.is_file()] == []


def test_a_checkpoint_directory_the_nodes_do_not_share_is_refused(workspace, tmp_path):
    # A relative location resolves against each node's own working directory: two directories, as two
    # nodes' local disks would be.
    cfg = _base(workspace, tmp_path / "unshared")
    cfg["checkpoint"]["location"] = "ckpts"
    config = _write(cfg, tmp_path / "unshared.json")
    cwd = [tmp_path / "node0-cwd", tmp_path / "node1-cwd"]
    for path in cwd:
        path.mkdir()
    nodes = Nodes(config, tmp_path, "unshared", cwd=cwd)
    codes = nodes.wait()
    assert codes[0] != 0 and codes[1] != 0, nodes.tail()
    for log in nodes.logs:  # both nodes name the problem and the fix, not a hang or a peer's broken pipe
        assert "checkpoint.location ckpts is not shared by every node" in log.read_text()
        assert "ReadWriteMany volume or use s3://" in log.read_text()
    assert not list((cwd[0] / "ckpts").glob("step-*"))
