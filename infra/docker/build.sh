#!/usr/bin/env bash
# Build vlpipe's container images, tagged with the package version (pyproject.toml), and optionally push them.
#
#   bash infra/docker/build.sh                    # all images (`make images`)
#   bash infra/docker/build.sh --only serving     # one image (train | serving | mlflow; repeatable)
#   bash infra/docker/build.sh --push             # build, then push every tag
#   bash infra/docker/build.sh -- --build-arg TRAIN_BASE_IMAGE=pytorch/pytorch:...   # extra engine arguments
#
# Images and Dockerfiles: `python -m vlpipe.infra.images list`. Tags: <repository>:<version>, plus
# <repository>:<version>-<commit> when git knows the commit. Labels: org.opencontainers.image.version/revision.
# The context is a temporary copy of the paths in vlpipe.infra.images.CONTEXT_PATHS only (no .venv, mlruns or .git),
# whatever the engine. Engines, first found: docker (with a reachable daemon), podman, buildah.
# No credentials are read or passed here: log in to the registry with your engine before --push.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

push=0
only=()
extra=()
while (($#)); do
    case "$1" in
        --push) push=1 ;;
        --only)
            [[ $# -ge 2 ]] || { echo "error: --only needs an image name" >&2; exit 64; }
            only+=("$2")
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 64 ;;
    esac
    shift
done

find_engine() {
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null 2>&1; then
        echo podman
    elif command -v buildah >/dev/null 2>&1; then
        echo buildah
    else
        return 1
    fi
}

if ! engine="$(find_engine)"; then
    echo "error: no container engine (docker daemon, podman or buildah) found; CI has none — build the images" \
        "on a machine with one" >&2
    exit 2
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then python="$ROOT/.venv/bin/python"; else python=python3; fi
fi
cd "$ROOT"
version="$("$python" -m vlpipe.infra.images version)"
mapfile -t images < <("$python" -m vlpipe.infra.images list)
mapfile -t context_paths < <("$python" -m vlpipe.infra.images context)

for name in "${only[@]}"; do
    found=0
    for line in "${images[@]}"; do [[ "${line%% *}" == "$name" ]] && found=1; done
    ((found)) || { echo "error: no image '$name' (see: python -m vlpipe.infra.images list)" >&2; exit 64; }
done

revision=unknown
commit=""
if command -v git >/dev/null 2>&1 && revision="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)"; then
    commit="${revision:0:12}"
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        echo "warning: uncommitted changes; the images are labelled with HEAD ($commit) but contain them" >&2
        commit="$commit-dirty"
    fi
else
    revision=unknown
fi

context="$(mktemp -d "${TMPDIR:-/tmp}/vlpipe-image-context.XXXXXX")"
trap 'rm -rf "$context"' EXIT
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - "${context_paths[@]}" | tar -C "$context" -xf -

built=()
for line in "${images[@]}"; do
    read -r name repository dockerfile <<<"$line"
    if ((${#only[@]})) && [[ " ${only[*]} " != *" $name "* ]]; then
        continue
    fi
    tags=("$repository:$version")
    [[ -n "$commit" ]] && tags+=("$repository:$version-$commit")
    args=(--file "$context/$dockerfile")
    for tag in "${tags[@]}"; do args+=(--tag "$tag"); done
    args+=(
        --build-arg "VLPIPE_VERSION=$version"
        --build-arg "VLPIPE_REVISION=$revision"
        --label "org.opencontainers.image.version=$version"
        --label "org.opencontainers.image.revision=$revision"
    )
    echo "==> $engine: building $name ($dockerfile) as ${tags[*]}" >&2
    if [[ "$engine" == buildah ]]; then
        buildah build "${args[@]}" "${extra[@]}" "$context" </dev/null
    else
        "$engine" build "${args[@]}" "${extra[@]}" "$context" </dev/null
    fi
    built+=("${tags[@]}")
done

if ((push)); then
    for tag in "${built[@]}"; do
        echo "==> $engine: pushing $tag" >&2
        "$engine" push "$tag" </dev/null
    done
fi
printf '%s\n' "${built[@]}"
