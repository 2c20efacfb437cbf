"""Reading compiled Kubeflow IR YAML in tests: the tasks of a pipeline's body and their edges."""

from __future__ import annotations

from pathlib import Path

import yaml


def load_ir(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and the Kubernetes platform spec (empty when the pipeline has none)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = docs[1]["platforms"]["kubernetes"] if len(docs) > 1 else {}
    return docs[0], platform


def body_tasks(spec: dict) -> dict[str, dict]:
    """The tasks inside the exit handler (the pipeline's body), by task name."""
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def sub_dag_tasks(spec: dict, task: dict) -> dict[str, dict]:
    """The tasks of a task's own DAG (a `dsl.If` condition's body), by task name."""
    return spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


def artifact_edges(tasks: dict[str, dict]) -> set[tuple[str, str]]:
    """(producer, consumer) for every artifact a task takes from another task."""
    edges = set()
    for name, task in tasks.items():
        for spec in task.get("inputs", {}).get("artifacts", {}).values():
            if "taskOutputArtifact" in spec:
                edges.add((spec["taskOutputArtifact"]["producerTask"], name))
    return edges


def parameter_edges(tasks: dict[str, dict]) -> set[tuple[str, str]]:
    """(producer, consumer) for every parameter a task takes from another task."""
    edges = set()
    for name, task in tasks.items():
        for spec in task.get("inputs", {}).get("parameters", {}).values():
            if "taskOutputParameter" in spec:
                edges.add((spec["taskOutputParameter"]["producerTask"], name))
    return edges


def constant(task: dict, parameter: str):
    """A task's constant parameter value."""
    return task["inputs"]["parameters"][parameter]["runtimeValue"]["constant"]
