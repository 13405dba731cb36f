#!/usr/bin/env bash
# The main job on the embedded synthetic data set, run the way a user runs it: every step prints its command.
#   synthetic raw Wukong-style CSV + images on a loopback HTTP server -> clean -> download -> export -> vocab
#   -> image tokenizer -> pre-tokenize -> DALLE -> CLIP -> dalle_gen.py per prompt -> clip_sort.py -> metrics, report
# A second run reuses finished steps; FRESH=1 starts over. DEMO_PROFILE=ci runs a tiny version (tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUN=${RUN_DIR:-runs/demo}
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

# --- sizes and budgets (the full demo: ~8-10 minutes on 2 CPU cores) -------------------------------------------------
N_RAW=3000; IMG=64  # IMG: the side models train at (raw images are 64 px: the download keeps sides >= 50)
VAE_ARGS=(--hidden-dim 64 --num-resnet-blocks 1 --num-tokens 512 --emb-dim 32 --batch-size 16 --lr 3e-3
          --schedule constant --max-steps 2400 --max-time 140)
JUDGE_ARGS=(--calib 480)
DALLE_ARGS=(--dim 192 --depth 4 --heads 4 --dim-head 48 --text-seq-len 16 --batch-size 16 --lr 2e-3
            --warmup-steps 50 --null-cond-prob 0.2 --max-steps 1200 --max-time 230)
CLIP_ARGS=(--model zh-tiny --batch-size 128 --lr 3e-3 --warmup-steps 30 --max-steps 450 --max-time 100)
N_GEN=64; COND_SCALE=3; GEN_TOP_K=8; TOP_K=4; GROUP=32  # GEN_TOP_K: sampling; TOP_K: reranked images kept
PROMPTS=("一个大的红色正方形" "一个大的蓝色圆形" "一个大的绿色三角形" "一个大的黄色星形"
         "一个大的红色圆形" "一个大的蓝色菱形" "一个大的绿色星形" "一个大的黄色三角形")
if [ "${DEMO_PROFILE:-full}" = ci ]; then
  N_RAW=400; IMG=32
  VAE_ARGS=(--hidden-dim 16 --num-resnet-blocks 0 --num-tokens 64 --emb-dim 16 --num-layers 2 --batch-size 16
            --lr 3e-3 --max-steps 40)
  JUDGE_ARGS=(--calib 48 --max-images 400 --steps 20)
  DALLE_ARGS=(--dim 32 --depth 1 --heads 2 --dim-head 16 --batch-size 16 --max-steps 20 --null-cond-prob 0.2
              --sample-images 2)
  CLIP_ARGS=(--model zh-tiny --batch-size 16 --epochs 1 --max-steps 10)
  N_GEN=8; GROUP=8; TOP_K=2; GEN_TOP_K=4
  PROMPTS=("一个大的红色正方形" "一个大的红色圆形")
fi

[ "${FRESH:-0}" = 1 ] && rm -rf "$RUN"
mkdir -p "$RUN"
T0=$(date +%s)
step() { echo; echo "+ $*"; "$@"; }
done_mark() { [ -f "$RUN/.done-$1" ]; }
# mark NAME START: the step finished; its wall time goes to timings.tsv
mark() { touch "$RUN/.done-$1"; printf '%s\t%s\n' "$1" "$(( $(date +%s) - $2 ))" >> "$RUN/timings.tsv"; }

# --- data ------------------------------------------------------------------------------------------------------------
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if ! done_mark raw; then
  t=$(date +%s)
  step $PY -m form_data synth --raw --out "$RUN/raw" --base-url "http://127.0.0.1:$PORT" --n $N_RAW --image-size 64
  mark raw $t
fi
# The raw CSV names the port it was made with; serve on that one.
PORT=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_url"].rsplit(":",1)[1])' "$RUN/raw/expected.json")

if ! done_mark clean; then
  t=$(date +%s)
  step $PY -m form_data clean "$RUN/raw/wukong_raw.csv" --keywords "$RUN/raw/keywords.txt" --out "$RUN/clean"
  mark clean $t
fi

if ! done_mark download; then
  t=$(date +%s)
  echo; echo "+ $PY -m form_data serve $RUN/raw/www --port $PORT &"
  $PY -m form_data serve "$RUN/raw/www" --port "$PORT" >/dev/null &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  $PY - "$PORT" <<'PYWAIT'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close(); break
    except OSError:
        time.sleep(0.1)
PYWAIT
  step $PY -m form_data download "$RUN/clean" --out "$RUN/data" --encode-format png --threads 16
  kill $SERVER 2>/dev/null || true
  mark download $t
fi

if ! done_mark export; then
  t=$(date +%s); step $PY -m form_data export "$RUN/data" --webdataset --attributes "$RUN/raw/attributes.jsonl"; mark export $t
fi
if ! done_mark vocab; then
  t=$(date +%s); step $PY -m form_data vocab "$RUN/data/train_clip.csv" --out "$RUN/vocab.txt"; mark vocab $t
fi

# --- image tokenizer -----------------------------------------------------------------------------------------------
if ! done_mark vae; then
  # one loader process: with bf16 the steps are short enough that loading in the same process costs ~0.5 dB in the budget
  t=$(date +%s)
  step $PY -m vae_train --model dvae --quantizer vq --train-data "$RUN/data/train_clip.csv" \
    --val-data "$RUN/data/val_clip.csv" --image-size $IMG "${VAE_ARGS[@]}" --activation leaky_relu --workers 1 \
    --precision "$($PY -c 'from train_runtime.trainer import cpu_training_precision as p; print(p())')" \
    --channels-last \
    --log-every 20 --eval-images 256 --out-dir "$RUN/vae"
  step $PY -m vae_train eval --tokenizer "$RUN/vae" --data "$RUN/data/val_clip.csv" --max-images 1000 \
    --out "$RUN/vae_eval.json"
  mark vae $t
fi
if ! done_mark judge; then
  t=$(date +%s)
  step $PY -m form_data judge train --data "$RUN/data/train_clip.csv" --out "$RUN/judge" "${JUDGE_ARGS[@]}"
  step $PY -m vae_train eval --tokenizer "$RUN/vae" --data "$RUN/judge/calib.csv" --max-images 100000 \
    --save-recon "$RUN/judge/recon" --out "$RUN/judge/recon_eval.json"
  mark judge $t
fi
if ! done_mark tokenize; then
  t=$(date +%s)
  for split in train val; do
    step $PY -m vae_train tokenize --tokenizer "$RUN/vae" --data "$RUN/data/${split}_clip.csv" \
      --out "$RUN/tokens/$split.pt" --workers 0 $([ "$split" = train ] && echo --hflip)
  done
  mark tokenize $t
fi

# --- DALLE and CLIP ------------------------------------------------------------------------------------------------
if ! done_mark dalle; then
  t=$(date +%s)
  step $PY -m dalle_train --train-data "$RUN/tokens/train.pt" --val-data "$RUN/tokens/val.pt" --vocab "$RUN/vocab.txt" \
    "${DALLE_ARGS[@]}" --workers 0 --log-every 20 --eval-every 200 --sample-prompts "${PROMPTS[0]}|${PROMPTS[-1]}" \
    --out-dir "$RUN/dalle"
  mark dalle $t
fi
if ! done_mark clip; then
  t=$(date +%s)
  step $PY -m clip_train --train-data "$RUN/data/train_clip.csv" --val-data "$RUN/data/val_clip.csv" \
    --val-attributes "$RUN/data/attributes.jsonl" --vocab "$RUN/vocab.txt" --image-size $IMG "${CLIP_ARGS[@]}" \
    --workers 0 --out-dir "$RUN/clip"
  mark clip $t
fi

# --- generate, rerank, measure --------------------------------------------------------------------------------------
if ! done_mark generate; then
  t=$(date +%s)
  mkdir -p "$RUN/logs"
  # Two prompts at a time, one thread each (two 2-thread processes on 2 cores stall in OpenMP's spin-waits: measured
  # 15-60 s per pair against 11 s): every command is printed when it starts, its own output goes to
  # logs/gen-p$i.log; a line reports each finished prompt.
  gen_one() {
    local i=$1 log="$RUN/logs/gen-p$1.log"
    : > "$log"
    for cmd in "dalle_gen.py|${PROMPTS[$i]}|$N_GEN|$RUN/gen/p$i|--checkpoint|$RUN/dalle|--cond-scale|$COND_SCALE|--top-k|$GEN_TOP_K|--seed|$((1000 * i))|--quiet" \
               "clip_sort.py|${PROMPTS[$i]}|$N_GEN|$RUN/gen/p$i|--scorer|clip:$RUN/clip|--top-k|$TOP_K"; do
      IFS='|' read -r -a args <<< "$cmd"
      echo "+ $PY ${args[*]}"
      OMP_NUM_THREADS=1 "$PY" "${args[@]}" >> "$log" 2>&1 || { echo "failed: $PY ${args[*]} (see $log)"; tail -5 "$log"; return 2; }
    done
    echo "  prompt $((i + 1))/${#PROMPTS[@]} generated and ranked: $RUN/gen/p$i ($(tail -1 "$log" | cut -c1-60)...)"
  }
  pids=()
  for i in "${!PROMPTS[@]}"; do
    gen_one "$i" & pids+=($!)
    if (( ${#pids[@]} == 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  mark generate $t
fi
t=$(date +%s)
step $PY -m form_data report "$RUN" --top-k $TOP_K --group-size $GROUP
printf 'report\t%s\n' "$(( $(date +%s) - t ))" >> "$RUN/timings.tsv"

cat <<DONE

== make demo finished in $(( $(date +%s) - T0 )) s (this run; steps reused from earlier runs are not counted) ==
report (open in a browser)  $RUN/report.html
metrics                     $RUN/metrics.json
raw Wukong-style CSV        $RUN/raw/wukong_raw.csv   (keywords: $RUN/raw/keywords.txt)
cleaned splits              $RUN/clean/{train,val}.csv   report: $RUN/clean/clean_report.json
downloaded images + exports $RUN/data/   (open_clip CSV, DALLE/BriVL JSONL, webdataset shards in wds/)
image tokenizer             $RUN/vae/   held-out metrics: $RUN/vae_eval.json
DALLE / CLIP runs           $RUN/dalle/   $RUN/clip/
generations + rankings      $RUN/gen/p*/   ({i}.png, grid.png, ranking.json, top/, ranked_grid.png)
DONE
