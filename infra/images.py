"""The container images vlpipe builds, the build context they need, and a small Dockerfile parser.

Standard library only (no torch, no pydantic): `infra/docker/build.sh` runs `python -m vlpipe.infra.images list` on a
build machine where the project may not be installed, and the tests parse the Dockerfiles with `parse_dockerfile`.

Every image is tagged with the package version (`project.version` in pyproject.toml), which is also what
`vlpipe.components.release.IMAGE` and `vlpipe.serving.deploy.serving_image()` name; tests/infra/test_images.py checks they agree.

    python -m vlpipe.infra.images version     # 0.1.0
    python -m vlpipe.infra.images list        # <name> <repository> <dockerfile>, one image a line
    python -m vlpipe.infra.images context     # the repository paths copied into the build context, one a line
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "infra" / "docker"
REGISTRY = "ghcr.io/vlpipe"


@dataclass(frozen=True)
class ImageSpec:
    """One image: a short name, its repository (no tag) and its Dockerfile relative to the repository root."""

    name: str
    repository: str
    dockerfile: str

    def ref(self, version: str) -> str:
        """`<repository>:<version>`."""
        return f"{self.repository}:{version}"


IMAGES = (
    # Every Kubeflow component runs on it (vlpipe.components.release.IMAGE).
    ImageSpec("train", f"{REGISTRY}/vlpipe", "infra/docker/Dockerfile.train"),
    # The KServe predictor, `vlpipe serve` (vlpipe.serving.deploy.IMAGE_REPOSITORY).
    ImageSpec("serving", f"{REGISTRY}/vlpipe-serving", "infra/docker/Dockerfile.serving"),
    # The MLflow tracking server of infra/k8s/base (mlflow + psycopg2 + boto3, versions from constraints.txt).
    ImageSpec("mlflow", f"{REGISTRY}/vlpipe-mlflow", "infra/docker/Dockerfile.mlflow"),
)

# What `build.sh` copies into the build context; everything else (.venv, mlruns, .vlpipe, tests, .git) stays
# out, whichever engine builds. The Dockerfiles COPY nothing else.
CONTEXT_PATHS = (
    "pyproject.toml",
    "setup.py",
    "constraints.txt",
    "README.md",
    "model",
    "objectives",
    "tracking",
    "components",
    "pipelines",
    "serving",
    "infra",
)


def image(name: str) -> ImageSpec:
    """The image called `name` (`train`, `serving`, `mlflow`).

    Raises:
        KeyError: no such image.
    """
    for spec in IMAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"no image {name!r}; known: {[spec.name for spec in IMAGES]}")


def project_version(pyproject: Path = REPO_ROOT / "pyproject.toml") -> str:
    """`project.version` of pyproject.toml: the version images are tagged with."""
    with pyproject.open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


# -- Dockerfile parsing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: the keyword in upper case and its arguments with continuations joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments and blank lines dropped, `\\` continuations joined).

    A deliberately small parser: no heredocs, no escape-directive changes. Enough to check what the tests check.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comment lines inside a continuation are ignored
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"Dockerfile ends inside a line continuation (instruction at line {start})")
    return instructions


_ARG_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def base_images(instructions: list[Instruction]) -> list[str]:
    """The image of every `FROM`, with `${ARG}`s replaced by the defaults of the ARGs declared before it.

    Raises:
        ValueError: a `FROM` uses an ARG without a default.
    """
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            if default:
                defaults[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]

            def resolve(match: re.Match[str], line: int = ins.line) -> str:
                name = match.group(1) or match.group(2)
                if name not in defaults:
                    raise ValueError(f"FROM at line {line} uses ARG {name} without a default")
                return defaults[name]

            ref = _ARG_REF.sub(resolve, words[0])
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if ref not in stages:
                images.append(ref)
    return images


def is_pinned(ref: str) -> bool:
    """True when an image reference names a digest, or a tag other than `latest`."""
    if "@sha256:" in ref:
        return True
    name = ref.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    return name.rsplit(":", 1)[1] not in ("", "latest")


def main(argv: list[str]) -> int:
    commands = {
        "version": lambda: print(project_version()),
        "list": lambda: print("\n".join(f"{s.name} {s.repository} {s.dockerfile}" for s in IMAGES)),
        "context": lambda: print("\n".join(CONTEXT_PATHS)),
    }
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m vlpipe.infra.images {{{','.join(commands)}}}", file=sys.stderr)
        return 64
    commands[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
