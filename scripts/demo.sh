#!/usr/bin/env bash
# The main job: build the tiny assets if missing, fine-tune with LoRA + ZeRO-2 on an embedded
# local Ray cluster, export the adapter and the merged model, print the report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
CONFIG="${1:-configs/tiny-lora-cpu.yaml}"
[ -f assets/tiny/model/config.json ] || elastic-ft make-tiny-assets assets/tiny
# train exports at the end (adapter/ + merged/); `elastic-ft export CONFIG` redoes just that.
elastic-ft train "$CONFIG"
echo "[demo] outputs: summary.json events.jsonl data_report.json adapter/ merged/ in the run's output_dir"
