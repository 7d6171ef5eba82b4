#!/usr/bin/env bash
# Run `mxlora bench` on a bare GPU machine that has torch/transformers/peft but not trl/datasets
# and cannot reach the network (the recipe of docs/BENCHMARKS.md):
#   bench/device.sh [CONFIG] [key=value ...]
# It installs the wheels carried in .whl/ (trl, datasets, dill, multiprocess) into /tmp/site,
# uses the package from src/ without installing it, keeps every cache in the checkout, and runs
# the bench with the Hub switched off. The tokenizer the checkpoint needs comes from
# .cache/mxlora/tokenizer when carried (else it is built, which needs quicktok-v1).
set -euo pipefail
config=${1:-bench/configs/gpt-oss-20b.yaml}
shift || true

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MXLORA_CACHE="$PWD/.cache/mxlora" HF_HOME="$PWD/.cache/hf"
site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as md
names = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "pyarrow", "fsspec")
print(" ".join(f"{n} {md.version(n)}" for n in names))
EOF
python3 -m mxlora.cli bench "$config" "$@"
