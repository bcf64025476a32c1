#!/usr/bin/env bash
# The GPU paths in one go: NVML monitor, NCCL + bf16 training under Ray Train with the probed
# micro-batch, a real CUDA OOM mid-run and its recovery, the memory model against
# torch.cuda.max_memory_allocated, and the probe against the largest real fit.
# Needs a CUDA GPU and the project's dependencies importable. Logs and results go to $OUT
# (default runs/gpu_checks); benchmark files also to benchmarks/results/<gpu>/.
#   bash scripts/gpu_checks.sh [train|oom|memory|pytest|bench-scaling|bench-matrix|bench-overhead ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_checks}"; mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
EFT="python3 -m elastic_ft.cli"
STEPS="${*:-pytest train oom memory}"

step() {  # name timeout_s command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"; echo "=== $name rc=$rc in $((SECONDS - t0)) s"
}
summarise() {  # run dir -> the lines a reader needs
  python3 - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
print("summary:", json.dumps({k: s.get(k) for k in ("steps", "final_loss", "tokens_per_s",
      "wall_tokens_per_s", "peak_mem_bytes", "restarts")}))
for line in (run / "events.jsonl").read_text().splitlines():
    e = json.loads(line)
    # plan: each rank's budget from its own GPU (NVML on its node), its cap and micro-batch
    if e.get("event") in ("inventory", "micro_batch_auto", "micro_batch_capped", "oom",
                         "replan_memory", "rebalance", "plan", "resume", "start", "run_end",
                         "run_failed"):
        print(json.dumps(e)[:400])
PY
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray, deepspeed, transformers, peft; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
[ -f assets/tiny/model/config.json ] || $EFT make-tiny-assets assets/tiny > /dev/null
[ -f assets/medium/model/config.json ] || $EFT make-tiny-assets assets/medium \
  --hidden-size 1024 --layers 16 --model-vocab 32000 > /dev/null

for s in $STEPS; do case $s in
  pytest) step pytest 240 python3 -m pytest -q -x -p no:cacheprovider \
            tests/resources/test_monitor.py tests/core/test_memory.py \
            tests/resources/test_warm_pool.py ;;
  train)  step train 240 $EFT train configs/medium-lora-gpu.yaml --no-export \
            --set output_dir=runs/gpu-train; summarise runs/gpu-train ;;
  oom)    # the planner sees 80 GB, the worker really has 6 GiB: micro 16 OOMs for real
          ELASTIC_FT_CUDA_MEM_CAP_BYTES=$((6 * 1024**3)) step oom 200 $EFT train \
            configs/medium-lora-gpu.yaml --no-export --set output_dir=runs/gpu-oom \
            --set train.micro_batch=16 --set train.max_steps=12 --set checkpoint.every_steps=4
          summarise runs/gpu-oom ;;
  memory) step memory 540 python3 benchmarks/memory_accuracy.py --model assets/tiny/model \
            --model assets/medium/model ;;
  # `elastic-ft bench` on the GPUs there are (one step each: every one fits a 10-min call);
  # results go to benchmarks/results/<gpu>/ like the CPU ones
  bench-scaling)  step bench-scaling 540 $EFT bench scaling configs/medium-lora-gpu.yaml \
            --workers "$(seq -s, 1 "$(nvidia-smi -L | wc -l)")" --steps 20 \
            --set train.micro_batch=8 ;;
  bench-matrix)   step bench-matrix 540 $EFT bench matrix configs/medium-lora-gpu.yaml \
            --workers 1 --zero 2,3 --attn sdpa --set train.micro_batch=4 ;;
  bench-overhead) step bench-overhead 540 $EFT bench overhead configs/medium-lora-gpu.yaml \
            --steps 40 --repeats 3 --set train.micro_batch=8 ;;
  *) echo "unknown step $s" ;;
esac; done
