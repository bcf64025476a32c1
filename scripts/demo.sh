#!/usr/bin/env bash
# The main job: build the tiny assets if missing, fine-tune with LoRA + ZeRO-2 on an embedded
# local Ray cluster, export the adapter and the merged model, print the report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
CONFIG="${1:-configs/tiny-lora-cpu.yaml}"
[ -f assets/tiny/model/config.json ] || elastic-ft make-tiny-assets assets/tiny
# train exports at the end (adapter/ + merged/); `elastic-ft export CONFIG` redoes just that.
# 5% of the samples held out: eval loss and two generated samples every 10 steps; TensorBoard
# logs in OUTPUT/tensorboard/; Ray's, DeepSpeed's and the workers' logs in OUTPUT/logs/run.log
elastic-ft train "$CONFIG" --set eval.holdout_fraction=0.05 --set eval.every_steps=10 \
  --set 'logging.trackers=[tensorboard]'
OUT="$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")"
echo "[demo] the fine-tuned model continues a prompt (elastic-ft generate):"
elastic-ft generate "$OUT" --prompt $'Write the word in capital letters.\nhammer' --max-new-tokens 8
echo "[demo] outputs in $OUT: summary.json events.jsonl metrics.jsonl samples.jsonl data_report.json tensorboard/ logs/ adapter/ merged/"
