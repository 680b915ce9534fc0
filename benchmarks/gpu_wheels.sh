#!/usr/bin/env bash
# Run HERE (where pip reaches PyPI), before benchmarks/gpu.sh on a GPU machine that has no
# package registry: downloads into .whl/ (git-ignored through .git/info/exclude) the wheels
# that machine's image lacks (its python3 is 3.12 with torch, numpy, h5py, numba, click,
# scipy, matplotlib, safetensors, tqdm already; see the device tool's KINDS.md).
# Then carry .whl with the call; gpu.sh installs them into /tmp/site itself.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# versions as pyproject.toml admits them; one version of each
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl \
    nibabel==5.4.2 isal==1.9.1 zlib-ng==1.1.0 importlib-resources
ls -la .whl
