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
#          idle), each `bench.published --tune --challenge` (weights and length penalty chosen on
#          the dev set, on the grid of the CPU records, and the run replaces its row's record only
#          if its best dev score is better: else the test set is not decoded); records and logs to
#          $OUT. QUALITY_SEED=N (default 2) trains with train.seed=N, another run than the CPU's.
#   g2p    the G2P ensemble's members (bench/published.py G2P_SEEDS): the attention G2P row's
#          settings, one run per seed, side by side until G2P_DEADLINE seconds (390), then each
#          recorded (the best checkpoint; alpha chosen on dev) within G2P_RECORD_S seconds (150;
#          0: record them where the weights come back, with --skip-train --tune --averages). To
#          $OUT: each run's best weights, and run files and records in g2p_runs.tgz (unpack in
#          the repository root).
#          Carry data/cmudict, made here by `aligna prepare-cmudict data/cmudict`:
#          run(command="ALIGNA_GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu.sh g2p",
#              carry=["data/cmudict"], timeout_s=590)
#   QUALITY_STEPS=N caps every run at N updates (a dry run of the script, on any device).
# Records land in bench/results/ and are copied to $OUT, which the device tool brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT" ../shared/data
[ -e ../shared/data/multi30k ] || ln -sfn "$PWD/.gpu-data" ../shared/data/multi30k
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
  published() {  # ROW [overrides...]: train, choose on dev, and if dev beats the record's, score the test set once
    local row=$1; shift
    $PY -m bench.published "$row" --tune --challenge --alphas 0.0 0.6 1.0 1.4 2.0 --set train.device="$device" \
        --set train.seed="${QUALITY_SEED:-2}" --set model_dir="runs/gpu-$row" \
        "$@" "${cap[@]}" > "$OUT/$row.log" 2>&1 || echo "$row failed: see $OUT/$row.log" >&2
    grep -E ": aligna .* (met|missed) by|^--challenge: " "$OUT/$row.log" | sed "s/^/$row: /" || true
  }
  started=$SECONDS
  for row in multi30k_en_de_transformer_tiny multi30k_en_fr_transformer_tiny multi30k_de_en_transformer_tiny; do
    published "$row" &
  done
  wait
  echo "quality: $((SECONDS - started)) s" | tee "$OUT/quality.txt"
  cp bench/results/published_*tiny*.json "$OUT/" 2>/dev/null || true
  ;;
g2p)
  # The config's recipe (fp32, plateau schedule, init 0.1), 4 threads a run.
  settings=(--set train.num_threads=4)
  cap=()
  [ -n "${QUALITY_STEPS:-}" ] && cap=(--train-set "train.max_steps=$QUALITY_STEPS")
  read -r -a seeds <<< "${G2P_SEEDS:-2 3 4}"
  deadline=$((SECONDS + ${G2P_DEADLINE:-390}))
  log=$OUT/g2p.log
  mkdir -p runs/exp
  cat "$OUT/gpu.txt" > "$log"
  rm "$OUT/gpu.txt"  # $OUT brings back 8 files at most: logs go into g2p.log and g2p_runs.tgz
  status() {  # every run's last dev line
    for seed in "${seeds[@]}"; do
      echo "$((SECONDS))s seed $seed: $(grep -h " dev: " "runs/exp/g2p_att_gpu_seed$seed/train.log" 2>/dev/null | tail -n 1)"
    done >> "$log"
  }
  until_done() {  # PID...: wait for them until the deadline, then interrupt them; 0 when none was cut short
    while (( SECONDS < deadline )) && kill -0 "$@" 2>/dev/null; do sleep 10; status; done
    local cut=0
    # TERM: a script's background jobs ignore SIGINT; best.safetensors and checkpoints are written whole
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && { kill -TERM "$pid"; cut=1; }; done
    wait "$@" || true
    return $cut
  }
  pids=()
  for seed in "${seeds[@]}"; do
    $PY -m aligna train configs/cmudict_g2p_attention.yaml "${settings[@]}" "${cap[@]/--train-set/--set}" \
        --set train.seed="$seed" --set model_dir="runs/exp/g2p_att_gpu_seed$seed" --overwrite --no-progress \
        > "runs/g2p_seed$seed.train.log" 2>&1 &
    pids+=($!)
  done
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  until_done "${pids[@]}" || true
  notes=() stops=()
  for seed in "${seeds[@]}"; do  # how each run ended: its own end (early stopping, the last epoch) or the deadline
    note="trained on ${gpu:-the CPU} (fp32), ${#seeds[@]} runs side by side"
    stop=""
    if grep -q "^trained [0-9]* updates" "runs/g2p_seed$seed.train.log"; then
      note+=", to its end ($(grep -h -o -E "early stopping|max_steps|[0-9]+ epochs" "runs/g2p_seed$seed.train.log" | head -n 1 || true))"
    else
      step=$(grep -h -o -E "step [0-9]+/" "runs/g2p_seed$seed.train.log" | tail -n 1 | tr -d / || true)
      note+=", stopped at the device session's deadline (${G2P_DEADLINE:-390} s) at ${step:-its start}: its best checkpoint is the best dev score until then"
      # the reproduce line's aligna train stops at the latest checkpoint, as this run did
      latest=$(grep -o -E "step-[0-9]+" "runs/exp/g2p_att_gpu_seed$seed/latest.json" 2>/dev/null | tr -dc 0-9 || true)
      [ -n "$latest" ] && stop="train.max_steps=$((10#$latest))"
    fi
    notes+=("$note") stops+=("$stop")
    echo "seed $seed: $note" >> "$log"
  done
  deadline=$((deadline + ${G2P_RECORD_S:-150}))
  pids=()
  (( ${G2P_RECORD_S:-150} > 0 )) && for i in "${!seeds[@]}"; do
    seed=${seeds[$i]}
    $PY -m bench.published "cmudict_g2p_attention_seed$seed" --skip-train --tune --averages --alphas 0.0 0.6 1.0 1.4 2.0 \
        "${settings[@]}" "${cap[@]}" ${stops[$i]:+--train-set "${stops[$i]}"} --set train.seed="$seed" \
        --set model_dir="runs/exp/g2p_att_gpu_seed$seed" --note "${notes[$i]}" > "runs/g2p_seed$seed.record.log" 2>&1 &
    pids+=($!)
  done
  (( ${#pids[@]} )) && { until_done "${pids[@]}" || echo "recording: cut short at the deadline" >> "$log"; }
  for seed in "${seeds[@]}"; do
    grep -h -E "^(dev|record|.*(met|missed) by)" "runs/g2p_seed$seed.record.log" 2>/dev/null | sed "s/^/seed $seed: /" >> "$log" || true
    cp "runs/exp/g2p_att_gpu_seed$seed/best.safetensors" "$OUT/g2p_seed$seed.best.safetensors" 2>/dev/null || true
  done
  # the run files without their weights (best ones above; checkpoints keep trainer.json and manifest.json)
  tar czf "$OUT/g2p_runs.tgz" --exclude=best.safetensors --exclude='*/corpus' --exclude='*/tensorboard' --exclude='*.lock' \
      --exclude='model.safetensors' --exclude='optimizer.safetensors' --exclude='averaged.safetensors' \
      runs/exp/g2p_att_gpu_seed* runs/g2p_seed*.log \
      $(ls bench/results/published_cmudict_g2p_attention_seed*.json 2>/dev/null) >> "$log" 2>&1 || true
  echo "g2p: $((SECONDS))s in all" >> "$log"
  cat "$log"
  ;;
*)
  echo "usage: bash bench/gpu.sh {speed|full|quality|g2p}" >&2
  exit 2
  ;;
esac
