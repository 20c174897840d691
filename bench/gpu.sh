#!/usr/bin/env bash
# The checks that need a GPU, for a session that is lent one (the `device` tool: one H200,
# PyTorch, sacrebleu, sentencepiece and safetensors already installed there, no network).
#
# Here, once:   mkdir -p .gpu-data && cp ../shared/data/multi30k/*.gz .gpu-data/
#               echo /.gpu-data/ >> .git/info/exclude
# Then:         run(command="bash bench/gpu.sh speed", carry=[".gpu-data"], timeout_s=600)
#               run(command="bash bench/gpu.sh full", carry=[".gpu-data"], timeout_s=600)
#
#   speed  bf16 autocast and torch.compile against fp32: target tokens/s and model FLOPs
#          utilization (MFU, against the H200's 989 dense bf16 TFLOP/s) of the three Multi30k
#          Transformer configs; a torchrun job on nccl (one process per GPU, here one).
#   full   whole runs of the de->en, en->de and en->fr Transformer configs, bf16, timed.
#   quality  the published rows that a CPU core needs hours for (issue 16): the three
#          Transformer-tiny runs side by side (a 2 M-parameter model leaves most of the chip
#          idle), then the two CMUdict ones, each `bench.published --tune` (weights and length
#          penalty chosen on the dev set); records and logs to $OUT. Carry data/cmudict too:
#          run(command="bash bench/gpu.sh quality", carry=[".gpu-data", "data/cmudict"], timeout_s=600)
#          QUALITY_STEPS=N caps every run at N updates (a dry run of the script, on any device).
# Records land in bench/results/ and are copied to $OUT, which the device tool brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" ../shared/data
[ -e ../shared/data/multi30k ] || ln -s "$PWD/.gpu-data" ../shared/data/multi30k
PY=${PY:-python3}
CONFIGS=(configs/multi30k_de_en_transformer.yaml configs/multi30k_en_de_transformer.yaml
         configs/multi30k_en_fr_transformer.yaml)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" || true  # none on a dry run

case "${1:-speed}" in
speed)
  $PY -m bench.train_speed "${CONFIGS[@]}" --device cuda --steps 60 --warmup 10 --peak-tflops 989 \
      --name train_speed_gpu_fp32 2>&1 | tee "$OUT/speed.log"
  $PY -m bench.train_speed "${CONFIGS[@]}" --device cuda --steps 60 --warmup 10 --peak-tflops 989 \
      --set train.precision=bf16 --name train_speed_gpu_bf16 2>&1 | tee -a "$OUT/speed.log"
  $PY -m bench.train_speed "${CONFIGS[@]}" --device cuda --steps 60 --warmup 10 --peak-tflops 989 \
      --set train.precision=bf16 --set train.batch_tokens=16384 --compile --name train_speed_gpu_bf16_compile \
      2>&1 | tee -a "$OUT/speed.log"
  # DDP on nccl: the torchrun path end to end (one GPU here: one process)
  $PY -m torch.distributed.run --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" -m aligna train \
      configs/multi30k_de_en_transformer.yaml --no-progress --overwrite --set model_dir=runs/gpu-ddp \
      --set train.device=cuda --set train.precision=bf16 --set train.max_steps=200 --set train.validate_every=100 \
      2>&1 | tee "$OUT/ddp.log"
  cp bench/results/train_speed_gpu_*.json "$OUT/"
  ;;
full)
  for config in "${CONFIGS[@]}"; do
    name=$(basename "$config" .yaml)
    started=$SECONDS
    $PY -m aligna train "$config" --no-progress --overwrite --set model_dir="runs/gpu-$name" \
        --set train.device=cuda --set train.precision=bf16 2>&1 | tee "$OUT/$name.log" | grep -E "dev:|test|trained"
    echo "$name: $((SECONDS - started)) s from start to the test scores" | tee -a "$OUT/$name.log"
  done
  ;;
quality)
  device=${DEVICE:-cuda}
  cap=()
  [ -n "${QUALITY_STEPS:-}" ] && cap=(--set "train.max_steps=$QUALITY_STEPS" --set train.epochs=1000)
  published() {  # ROW [overrides...]: train, choose on dev, score the test set once
    local row=$1; shift
    $PY -m bench.published "$row" --tune --set train.device="$device" --set model_dir="runs/gpu-$row" \
        "$@" "${cap[@]}" > "$OUT/$row.log" 2>&1 || echo "$row failed: see $OUT/$row.log" >&2
    grep -E ": aligna .* (met|missed) by" "$OUT/$row.log" | sed "s/^/$row: /" || true
  }
  started=$SECONDS
  for row in multi30k_en_de_transformer_tiny multi30k_en_fr_transformer_tiny multi30k_de_en_transformer_tiny; do
    published "$row" &
  done
  # the G2P settings of the CPU run in progress (bf16, plateau schedule, init 0.1), given the
  # epochs a GPU affords
  published cmudict_g2p_attention --set train.precision=bf16 --set train.epochs=60 --set train.schedule=plateau \
      --set train.plateau_patience=1 --set train.min_lr=0.00001 --set train.early_stopping_patience=8 \
      --set model.rnn.init_range=0.1 &
  published cmudict_g2p_transformer --set train.precision=bf16 --set train.epochs=100 &
  wait
  echo "quality: $((SECONDS - started)) s" | tee "$OUT/quality.txt"
  cp bench/results/published_*tiny*.json bench/results/published_cmudict_*.json "$OUT/" 2>/dev/null || true
  ;;
*)
  echo "usage: bash bench/gpu.sh {speed|full|quality}" >&2
  exit 2
  ;;
esac
