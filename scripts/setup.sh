#!/usr/bin/env bash
# Create .venv with augserver (editable), the client extra, the test tools and matplotlib
# (the evaluation plots).
# torch must come first and exactly as torch==2.13.0 on this kind of machine (a local CPU
# wheel); any other spec pulls a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[client,test,plot]"
# Compile the AugMix kernels into numba's cache now, so that the first run does not.
.venv/bin/augserver warm-up
