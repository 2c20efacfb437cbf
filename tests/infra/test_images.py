"""The Dockerfiles and build.sh, checked without a container engine (CI has none): pinned bases, the tags the
Python code expects, non-root users, no credentials, the serving entrypoint, and build.sh's commands as a fake
engine records them."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vlpipe.components.release import IMAGE, VERSION
from vlpipe.infra.images import (
    CONTEXT_PATHS,
    DOCKER_DIR,
    IMAGES,
    REPO_ROOT,
    base_images,
    image,
    is_pinned,
    parse_dockerfile,
    project_version,
)
from vlpipe.infra.manifests import CREDENTIAL_NAME
from vlpipe.serving.deploy import IMAGE_REPOSITORY as SERVING_REPOSITORY
from vlpipe.serving.deploy import TEMPLATE_DIR, serving_image

BUILD_SH = DOCKER_DIR / "build.sh"
NO_ENGINE_MESSAGE = (
    "no container engine (docker daemon, podman or buildah) found; CI has none — build the images on a machine "
    "with one"
)


def _instructions(name: str):
    return parse_dockerfile((REPO_ROOT / image(name).dockerfile).read_text())


def _args(instructions, keyword: str) -> list[str]:
    return [ins.args for ins in instructions if ins.keyword == keyword]


def _constraint(package: str) -> str:
    text = (REPO_ROOT / "constraints.txt").read_text()
    match = re.search(rf"(?im)^{re.escape(package)}==(\S+)$", text)
    assert match, f"constraints.txt pins no {package}"
    return match.group(1)


# -- the parser and helpers the other tests rely on ----------------------------------------------------------------
def test_parse_dockerfile_joins_continuations_and_drops_comments():
    text = "# c\nARG A=1\nFROM img:${A} AS build\nRUN a \\\n  # inner comment\n  && b\n\nUSER 10\n"
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("ARG", "A=1", 2),
        ("FROM", "img:${A} AS build", 3),
        ("RUN", "a && b", 4),
        ("USER", "10", 8),
    ]
    assert base_images(parsed) == ["img:1"]
    with pytest.raises(ValueError, match="line 1"):
        base_images(parse_dockerfile("FROM img:${NOPE}\n"))


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("python:3.11.13-slim", True),
        ("python", False),
        ("python:latest", False),
        ("registry:5000/team/img", False),  # the colon is the registry's port, not a tag
        ("registry:5000/team/img:1.2", True),
        ("img@sha256:" + "0" * 64, True),
    ],
)
def test_is_pinned(ref, pinned):
    assert is_pinned(ref) is pinned


# -- names and tags ---------------------------------------------------------------------------------------------
def test_image_names_match_what_the_code_deploys():
    assert project_version() == VERSION == "0.1.0"
    assert image("train").ref(VERSION) == IMAGE == "ghcr.io/vlpipe/vlpipe:0.1.0"
    assert image("serving").repository == SERVING_REPOSITORY
    assert image("serving").ref(VERSION) == serving_image(VERSION) == "ghcr.io/vlpipe/vlpipe-serving:0.1.0"
    assert [spec.name for spec in IMAGES] == ["train", "serving", "mlflow"]
    for spec in IMAGES:
        assert (REPO_ROOT / spec.dockerfile).is_file(), spec.dockerfile


def test_context_paths_exist_and_cover_every_copy():
    for path in CONTEXT_PATHS:
        assert (REPO_ROOT / path).exists(), path
    assert "tests" not in CONTEXT_PATHS and ".venv" not in CONTEXT_PATHS
    for spec in IMAGES:
        for args in _args(_instructions(spec.name), "COPY"):
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            for source in sources:
                top = source.rstrip("/").split("/")[0]
                assert top in CONTEXT_PATHS, (
                    f"{spec.dockerfile} copies {source}, which the build context lacks"
                )


# -- every Dockerfile ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [spec.name for spec in IMAGES])
def test_base_image_is_pinned(name):
    bases = base_images(_instructions(name))
    assert len(bases) == 1
    assert is_pinned(bases[0]), f"{name}: FROM {bases[0]} has no tag or digest, or uses latest"


def test_torch_base_images_carry_the_pinned_torch():
    torch = _constraint("torch")
    assert torch == "2.13.0"
    train = base_images(_instructions("train"))[0]
    serving = base_images(_instructions("serving"))[0]
    assert train.startswith(f"pytorch/pytorch:{torch}-cuda") and train.endswith("-devel")
    # The same PyTorch build for both: the serving tag is the training tag with runtime for devel.
    assert serving == train.removesuffix("-devel") + "-runtime"


@pytest.mark.parametrize("name", [spec.name for spec in IMAGES])
def test_runs_as_a_non_root_user(name):
    users = _args(_instructions(name), "USER")
    assert users, f"{name}: no USER instruction (the image would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"{name}: USER {users[-1]}"


def _declared_variables(instructions) -> dict[str, str]:
    variables = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            variables[name.strip()] = value
        elif ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                name, _, value = word.partition("=")
                variables[name] = value
    return variables


def _credential_variables(instructions) -> list[str]:
    return [name for name in _declared_variables(instructions) if CREDENTIAL_NAME.search(name)]


@pytest.mark.parametrize("name", [spec.name for spec in IMAGES])
def test_no_credentials_in_env_or_build_args(name):
    assert _credential_variables(_instructions(name)) == []


def test_credential_check_catches_env_and_arg():
    parsed = parse_dockerfile(
        "FROM a:1\nARG HF_TOKEN\nENV A=1 AWS_SECRET_ACCESS_KEY=x\nENV MLFLOW_TRACKING_PASSWORD y\n"
    )
    # The legacy `ENV NAME value` form is read as NAME plus a bare word; the name is still caught.
    assert _credential_variables(parsed) == ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"]


@pytest.mark.parametrize("name", [spec.name for spec in IMAGES])
def test_oci_labels_and_version_build_arg(name):
    instructions = _instructions(name)
    labels = " ".join(_args(instructions, "LABEL"))
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{name}: no {key} label"
    assert 'org.opencontainers.image.version="${VLPIPE_VERSION}"' in labels
    declared = _declared_variables(instructions)
    assert "VLPIPE_VERSION" in declared and "VLPIPE_REVISION" in declared
    assert declared["PYTHONUNBUFFERED"] == "1"


def _install_block(name: str) -> list[str]:
    """From the COPY of pyproject.toml to the first USER: the installation, meant identical in both images."""
    instructions = _instructions(name)
    start = next(
        i for i, ins in enumerate(instructions) if ins.keyword == "COPY" and "pyproject.toml" in ins.args
    )
    end = next(i for i, ins in enumerate(instructions) if ins.keyword == "USER")
    return [f"{ins.keyword} {ins.args}" for ins in instructions[start:end]]


def test_train_image_installs_the_project_with_the_constraints_and_keeps_cuda_torch():
    block = "\n".join(_install_block("train"))
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in block
    assert "pip install --no-deps -c constraints.txt ." in block
    assert "pip check" in block
    assert "torch.version.cuda" in block  # fails the build if pip swapped in the CPU wheel
    assert _constraint("deepspeed")  # a project dependency, so the same install brings DeepSpeed
    declared = _declared_variables(_instructions("train"))
    home = declared["HOME"]
    assert declared["VLPIPE_HOME"].startswith(home + "/")
    assert declared["TORCH_EXTENSIONS_DIR"].startswith(home + "/")  # DeepSpeed JIT ops need a writable dir
    assert any(f"chown -R 10001:0 {home}" in run for run in _args(_instructions("train"), "RUN"))


def test_train_and_serving_install_blocks_are_identical():
    assert _install_block("train") == _install_block("serving")


def test_serving_entrypoint_matches_the_inference_service():
    instructions = _instructions("serving")
    entrypoint = yaml.safe_load(_args(instructions, "ENTRYPOINT")[-1])
    cmd = yaml.safe_load(_args(instructions, "CMD")[-1])
    assert entrypoint == ["vlpipe", "serve"]
    isvc = yaml.safe_load((TEMPLATE_DIR / "inferenceservice.yaml").read_text())
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["command"] == entrypoint
    assert (
        cmd
        == container["args"]
        == ["--model-uri", "/mnt/models", "--name", "vlpipe", "--host", "0.0.0.0", "--port", "8080"]
    )
    assert "8080" in " ".join(_args(instructions, "EXPOSE")).split()
    assert container["ports"][0]["containerPort"] == 8080
    healthcheck = _args(instructions, "HEALTHCHECK")
    assert healthcheck and "http://127.0.0.1:8080/v2/health/live" in healthcheck[0]


def test_mlflow_image_has_the_pinned_mlflow_with_postgres_and_s3_drivers():
    instructions = _instructions("mlflow")
    run = " ".join(_args(instructions, "RUN"))
    assert "pip install -c /tmp/constraints.txt mlflow boto3" in run
    assert '"psycopg2-binary==${PSYCOPG2_VERSION}"' in run
    assert re.fullmatch(r"\d+\.\d+\.\d+", _declared_variables(instructions)["PSYCOPG2_VERSION"])
    assert _constraint("mlflow") == "3.17.2" and _constraint("boto3")
    assert "5000" in " ".join(_args(instructions, "EXPOSE")).split()


# -- build.sh ----------------------------------------------------------------------------------------------------
def test_build_script_syntax():
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run([bash, "-n", str(BUILD_SH)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _bin_dir(tmp_path: Path, *, fakes: dict[str, str]) -> Path:
    """A PATH of its own: the few real tools build.sh needs (no docker, podman, buildah, git) plus fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mktemp", "tar", "rm", "sed"):
        real = shutil.which(tool)
        assert real, f"{tool} is needed to run build.sh"
        (bin_dir / tool).symlink_to(real)
    (bin_dir / "python3").symlink_to(REPO_ROOT / ".venv" / "bin" / "python")
    bash = shutil.which("bash")
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(f"#!{bash}\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def _run_build(bin_dir: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent), "TMPDIR": str(bin_dir.parent)}
    if log is not None:
        env["FAKE_LOG"] = str(log)
    return subprocess.run(
        [str(bin_dir / "bash"), str(BUILD_SH), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("fakes", [{}, {"docker": "exit 1"}], ids=["nothing", "docker-without-daemon"])
def test_build_script_without_an_engine_exits_2(tmp_path, fakes):
    # docker without a reachable daemon does not count: its `docker info` fails.
    bin_dir = _bin_dir(tmp_path, fakes=fakes)
    result = _run_build(bin_dir)
    assert result.returncode == 2
    assert NO_ENGINE_MESSAGE in " ".join(result.stderr.split())


# A fake engine: records each call's arguments (NUL-separated) and, for `build`, what the context holds.
_FAKE_ENGINE = r"""
log="$FAKE_LOG"
[[ "$1" == info ]] && exit 0
shopt -s nullglob dotglob
calls=("$log"/call-*)
n=$(printf %03d "${#calls[@]}")
printf '%s\0' "${0##*/}" "$@" > "$log/call-$n"
if [[ "$1" == build ]]; then
    (cd "${@: -1}" && printf '%s\n' * infra/docker/*) > "$log/context-$n"
fi
"""
_FAKE_GIT = r"""
case "$*" in
    *"rev-parse HEAD"*) echo 0123456789abcdef0123456789abcdef01234567 ;;
    *"status --porcelain"*) ;;
    *) exit 1 ;;
esac
"""


def _calls(log: Path) -> list[list[str]]:
    return [p.read_text().split("\0")[:-1] for p in sorted(log.glob("call-*"))]


def _flag_values(call: list[str], flag: str) -> list[str]:
    return [call[i + 1] for i, word in enumerate(call) if word == flag]


@pytest.mark.parametrize("with_git", [True, False])
def test_build_script_tags_labels_and_context(tmp_path, with_git):
    log = tmp_path / "log"
    log.mkdir()
    fakes = {"docker": _FAKE_ENGINE, **({"git": _FAKE_GIT} if with_git else {})}
    result = _run_build(_bin_dir(tmp_path, fakes=fakes), log=log)
    assert result.returncode == 0, result.stderr
    builds = _calls(log)
    assert [call[:2] for call in builds] == [["docker", "build"]] * 3
    revision = "0123456789abcdef0123456789abcdef01234567" if with_git else "unknown"
    for spec, call in zip(IMAGES, builds, strict=True):
        tags = [f"{spec.repository}:{VERSION}"]
        if with_git:
            tags.append(f"{spec.repository}:{VERSION}-0123456789ab")
        assert _flag_values(call, "--tag") == tags
        assert _flag_values(call, "--file")[0].endswith(spec.dockerfile)
        assert _flag_values(call, "--build-arg") == [
            f"VLPIPE_VERSION={VERSION}",
            f"VLPIPE_REVISION={revision}",
        ]
        assert _flag_values(call, "--label") == [
            f"org.opencontainers.image.version={VERSION}",
            f"org.opencontainers.image.revision={revision}",
        ]
    assert IMAGE in _flag_values(builds[0], "--tag")
    assert serving_image(VERSION) in _flag_values(builds[1], "--tag")
    context = (log / "context-000").read_text().split()
    assert sorted(c for c in context if "/" not in c) == sorted(
        CONTEXT_PATHS
    )  # no .venv, tests, mlruns, .git
    assert "infra/docker/Dockerfile.train" in context
    assert result.stdout.split()[0] == IMAGE  # the tags built, one a line


def test_build_script_falls_back_to_podman_and_pushes(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    bin_dir = _bin_dir(tmp_path, fakes={"docker": "exit 1", "podman": _FAKE_ENGINE})
    result = _run_build(bin_dir, "--only", "serving", "--push", log=log)
    assert result.returncode == 0, result.stderr
    calls = _calls(log)
    assert [call[:2] for call in calls] == [["podman", "build"], ["podman", "push"]]
    assert _flag_values(calls[0], "--tag") == [serving_image(VERSION)]
    assert calls[1][2] == serving_image(VERSION)


def test_build_script_rejects_unknown_arguments(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    bin_dir = _bin_dir(tmp_path, fakes={"docker": _FAKE_ENGINE})
    assert _run_build(bin_dir, "--frobnicate", log=log).returncode == 64
    result = _run_build(bin_dir, "--only", "nope", log=log)
    assert result.returncode == 64 and "no image 'nope'" in result.stderr
    assert _calls(log) == []
