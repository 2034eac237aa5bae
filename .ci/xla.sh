#!/usr/bin/env bash
# Train a few steps on torch_xla (PJRT, CPU backend) and compare the losses with eager CPU.
# Uses its own venv (torch_xla pins torch exactly): XLA_VENV, default /tmp/xla-venv.
# The first run downloads ~4 GB (torch CUDA wheel + torch_xla); later runs reuse the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${XLA_VENV:-/tmp/xla-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch_xla" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet torch==2.9.0 torch_xla==2.9.0 \
        numpy soundfile soxr click tqdm safetensors matplotlib
fi
PJRT_DEVICE=CPU "$VENV/bin/python" tests/xla_check.py
