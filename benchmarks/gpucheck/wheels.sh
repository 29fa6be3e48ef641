#!/bin/sh
# Download, on a machine with internet, every wheel `make gpu-check` carries to a GPU
# machine (docs/gpu-check.md). Usage: benchmarks/gpucheck/wheels.sh [DIR] [PYTHON_VERSIONS]
# e.g. benchmarks/gpucheck/wheels.sh wheelhouse "3.11 3.12 3.13"
set -eu
dir=${1:-wheelhouse}
versions=${2:-"3.11 3.12 3.13"}
here=$(dirname "$0")
pip=${PIP:-"python3 -m pip"}
for v in $versions; do
  $pip download --only-binary=:all: --python-version "$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dir" -r "$here/requirements.txt"
done
ls "$dir"
