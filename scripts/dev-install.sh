#!/usr/bin/env bash
# Install hostcore and every plugin in editable mode, with the test tools, on a CPU machine.
#
# torch is pinned to 2.13.0 so that pip takes the CPU build where one is provided
# locally instead of pulling a multi-GB CUDA build; hostcore itself accepts 2.11-2.14.
# The FlashInfer plugin is installed without its dependencies: flashinfer-python
# (and the CUDA packages it brings) is only needed on a GPU host, and the CPU tests
# exercise the plugin against a fake of FlashInfer's API. CuPy is an extra of the
# CuPy and Marlin plugins ([cuda12]/[cuda13]) and is likewise left out here.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python3 -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[test]" -e moe_plugins/sentinel -e moe_plugins/cupy_preprocess -e moe_plugins/marlin \
    -e examples/last-non-local-sentinel
"${pip[@]}" --no-deps -e moe_plugins/flashinfer_onesided
python3 -m hostcore.cli.main plugins
