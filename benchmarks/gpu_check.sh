#!/usr/bin/env bash
# The one GPU check of issues 11 / 13 (benchmarks/README.md, "GPU check"): install the carried wheels, then run
# benchmarks/gpu_check.py (each part time-boxed, 450 s in all) with every JSON record written to $OUT.
#   device tool:   command "bash benchmarks/gpu_check.sh", carry [".whl", ".anchors"], timeout_s 560
#   CPU rehearsal: bash benchmarks/gpu_check.sh --smoke   (tiny models; records in benchmarks/results/gpu_check_smoke/)
# Extra arguments go to gpu_check.py (e.g. --parts diffusers_full train_sd15, --budget 300).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--smoke" ]]; then
    PY=${PY:-.venv/bin/python}
    OUT=${OUT:-benchmarks/results/gpu_check_smoke}
else
    PY=python3
    OUT=${OUT:?"OUT (the folder whose files come back) is set by the device tool; set it by hand elsewhere"}
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    cp -r .whl/site/. /tmp/site/
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt" || true
    $PY -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes as b; print(torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__, accelerate.__version__, b.__version__)" >> "$OUT/env.txt"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
