"""A cancelled pipeline run deletes its TrainJob through the real step wrapper, not only in-process.

Kubeflow Pipelines runs a lightweight component as `sh -ec '<program_path=...; python3 -m
kfp.dsl.executor_main ...>' <source> --executor_input ... --function_to_execute ...`; on a cancel, Argo's emissary
(PID 1 of the step's main container) forwards SIGTERM to that command's process group (argo-workflows
`workflow/executor/osspecific`: the command starts with Setpgid and `Kill` signals `-pgid`). Here the step's
exact command line, taken from a compiled component that waits on a TrainJob as the training steps do
(`run_trainjob`), runs as a subprocess in its own process group against a Kubernetes API server on 127.0.0.1
reached through a kubeconfig (`TrainJobApi.from_cluster`); SIGTERM to the group must end in a DELETE of the
TrainJob and a failed step. (Debian's dash does not `exec` the script's last command: Python is the shell's
child, so the group signal is what reaches it.)
"""

# No `from __future__ import annotations`: kfp reads the component's parameter annotations as types.

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from kfp import compiler, dsl

from vlpipe.components.training.trainjob import render_stage_trainjob, trainjob_name

from .test_trainjob import NAMESPACE, _ApiServer, _launch


@dsl.component(base_image="unused", install_kfp_package=False)
def wait_for_trainjob(manifest: str, namespace: str):
    """What a multi-node training step does once its TrainJob is rendered (`run_stage_trainjob`)."""
    import json

    from vlpipe.components.training.trainjob import TrainJobApi, run_trainjob

    run_trainjob(TrainJobApi.from_cluster(namespace), json.loads(manifest), poll_seconds=0.2, timeout_s=None)


def _step_command(tmp_path: Path, executor_input: dict) -> list[str]:
    """The container command and arguments Kubeflow Pipelines would run, from the compiled IR."""
    package = tmp_path / "component.yaml"
    compiler.Compiler().compile(wait_for_trainjob, str(package))
    container = yaml.safe_load(package.read_text())["deploymentSpec"]["executors"]["exec-wait-for-trainjob"][
        "container"
    ]
    assert container["command"][:2] == ["sh", "-ec"]  # the shell wrapper this test is about
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    return [*container["command"], *args]


def _kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "step", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "step"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def test_sigterm_to_the_step_s_process_group_deletes_the_trainjob(tmp_path):
    work = tmp_path / "run-1" / "mpo"
    work.mkdir(parents=True)
    manifest = render_stage_trainjob(
        _launch("internvl3-8b", "mpo", tmp_path), stage="mpo", task="mpo", run_key="run-1", namespace=NAMESPACE,
        work_dir=str(work),
    )  # fmt: skip
    name = trainjob_name("run-1", "mpo")
    executor_input = {
        "inputs": {"parameterValues": {"manifest": json.dumps(manifest), "namespace": NAMESPACE}},
        "outputs": {"outputFile": str(tmp_path / "output_metadata.json")},
    }
    with _ApiServer(["Running"]) as server:  # a TrainJob that would run for ever
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("KUBERNETES_")  # not in a pod: the kubeconfig, as on a workstation
        }
        env["KUBECONFIG"] = str(_kubeconfig(tmp_path / "kubeconfig", server.httpd.server_address[1]))
        # python3 = this venv's
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        step = subprocess.Popen(
            _step_command(tmp_path, executor_input),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,  # as the emissary starts it (Setpgid)
        )
        try:
            deadline = time.monotonic() + 120
            while sum(1 for res, verb, _ in server.requests if (res, verb) == ("trainjobs", "get")) < 2:
                assert step.poll() is None, step.communicate()[0]
                assert time.monotonic() < deadline, "the step never polled its TrainJob"
                time.sleep(0.05)
            assert name in server.fake.objects
            os.killpg(step.pid, signal.SIGTERM)  # the emissary forwarding Kubeflow's cancel
            output, _ = step.communicate(timeout=60)
        finally:
            if step.poll() is None:
                os.killpg(step.pid, signal.SIGKILL)
                step.wait()
        assert step.returncode != 0, output
        assert "StepCancelled" in output and f"received signal {int(signal.SIGTERM)}" in output
        assert server.fake.deleted == [name] and server.fake.objects == {}
        assert ("trainjobs", "delete") in {(res, verb) for res, verb, _ in server.requests}
