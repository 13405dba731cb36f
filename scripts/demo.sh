#!/usr/bin/env bash
# The main job on the embedded synthetic data set, run the way a user runs it: every step prints its command.
#   synthetic raw Wukong-style CSV + images on a loopback HTTP server -> clean -> download -> export -> vocab
#   -> image tokenizer -> pre-tokenize -> DALLE -> CLIP -> dalle_gen.py @prompts -> clip_sort.py @prompts
#   -> zh_t2i_eval (judge-space Frechet distance, generated vs real val images) -> metrics, report
# A second run reuses finished steps; FRESH=1 starts over. DEMO_PROFILE=ci runs a tiny version (tests use it).
# Every budget is FIXED work (steps, samples, images), never a time: the same seed gives the same metrics.json on any
# machine, up to float rounding. It uses CUDA when present (the same steps), else the CPU in fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUN=${RUN_DIR:-runs/demo}
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

# --- sizes and budgets: fixed work (the full demo: <= 10 minutes on a slow 2-core AVX2 CPU) --------------------------
N_RAW=2000; IMG=32  # IMG: the side models train at (raw images are 64 px: the download keeps sides >= 50)
# 32 px with 4x4-pixel tokens (8x8 = 64 tokens an image, as 64 px with 8x8-pixel tokens) costs a third of the compute a
# step and leaves three times the steps within the slow kind's 10 minutes (README: what the budgets buy).
VAE_ARGS=(--num-layers 2 --hidden-dim 64 --num-resnet-blocks 1 --num-tokens 512 --emb-dim 32 --batch-size 16 --lr 3e-3
          --schedule constant --max-steps 500)
JUDGE_ARGS=(--calib 320)
DALLE_ARGS=(--dim 128 --depth 4 --heads 4 --dim-head 32 --text-seq-len 16 --batch-size 16 --lr 3e-3
            --warmup-steps 30 --null-cond-prob 0.2 --max-steps 250)
CLIP_ARGS=(--model zh-tiny --batch-size 128 --lr 3e-3 --warmup-steps 20 --max-steps 70)
N_GEN=64; COND_SCALE=3; GEN_TOP_K=8; TOP_K=4; GROUP=32  # GEN_TOP_K: sampling; TOP_K: reranked images kept
# GENERATORS: NAME:FOLDER (under $RUN) of each generator's @prompts output, evaluated against the real val images into
# $RUN/eval/NAME.json, which the report reads whatever the names (a masked generator adds e.g. masked:gen_masked)
GENERATORS=(dalle:gen)
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
# begin NAME: a step starts; every CLI process of it logs its start-up seconds (interpreter + imports) to
# startup/NAME.tsv. mark NAME KIND: the step finished; its wall time goes to timings.tsv. KIND: compute (scales with
# the CPU's matmul rate, less its start-up) or io (data, HTTP: does not).
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
begin() { t=$EPOCHREALTIME; mkdir -p "$RUN/startup"; : > "$RUN/startup/$1.tsv"; export ZH_T2I_STARTUP_LOG="$RUN/startup/$1.tsv"; }
mark() {
  touch "$RUN/.done-$1"
  printf '%s\t%s\t%s\n' "$1" "$(since "$t")" "$2" >> "$RUN/timings.tsv"
}

# --- where it runs: one second of calibration (device, CPU capability, fp32 matmul GFLOP/s at the threads used) ---
$PY -m zh_t2i_demo calibrate --out "$RUN/calibration.json"

# --- data ------------------------------------------------------------------------------------------------------------
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if ! done_mark raw; then
  begin raw
  step $PY -m form_data synth --raw --out "$RUN/raw" --base-url "http://127.0.0.1:$PORT" --n $N_RAW --image-size 64
  mark raw io
fi
# The raw CSV names the port it was made with; serve on that one.
PORT=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_url"].rsplit(":",1)[1])' "$RUN/raw/expected.json")

if ! done_mark clean; then
  begin clean
  step $PY -m form_data clean "$RUN/raw/wukong_raw.csv" --keywords "$RUN/raw/keywords.txt" --out "$RUN/clean"
  mark clean io
fi

if ! done_mark download; then
  begin download
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
  mark download io
fi

if ! done_mark export; then
  begin export; step $PY -m form_data export "$RUN/data" --webdataset --attributes "$RUN/raw/attributes.jsonl"; mark export io
fi
if ! done_mark vocab; then
  begin vocab; step $PY -m form_data vocab "$RUN/data/train_clip.csv" --out "$RUN/vocab.txt"; mark vocab io
fi

# --- image tokenizer -----------------------------------------------------------------------------------------------
if ! done_mark vae; then
  # images are decoded once into a tensor cache (data/.cache/) that every later step reads; fp32 on CPU (bf16 on CUDA)
  begin vae
  step $PY -m vae_train --model dvae --quantizer vq --train-data "$RUN/data/train_clip.csv" \
    --val-data "$RUN/data/val_clip.csv" --image-size $IMG "${VAE_ARGS[@]}" --activation leaky_relu --workers 0 \
    --channels-last \
    --log-every 20 --eval-images 256 --out-dir "$RUN/vae"
  step $PY -m vae_train eval --tokenizer "$RUN/vae" --data "$RUN/data/val_clip.csv" --max-images 1000 \
    --out "$RUN/vae_eval.json"
  mark vae compute
fi
if ! done_mark judge; then
  begin judge
  step $PY -m zh_t2i_demo judge train --data "$RUN/data/train_clip.csv" --out "$RUN/judge" --image-size $IMG \
    "${JUDGE_ARGS[@]}"
  step $PY -m vae_train eval --tokenizer "$RUN/vae" --data "$RUN/judge/calib.csv" --max-images 100000 \
    --save-recon "$RUN/judge/recon" --out "$RUN/judge/recon_eval.json"
  mark judge compute
fi
if ! done_mark tokenize; then
  begin tokenize
  for split in train val; do
    step $PY -m vae_train tokenize --tokenizer "$RUN/vae" --data "$RUN/data/${split}_clip.csv" \
      --out "$RUN/tokens/$split.pt" --workers 0 $([ "$split" = train ] && echo --hflip)
  done
  mark tokenize compute
fi

# --- DALLE and CLIP ------------------------------------------------------------------------------------------------
if ! done_mark dalle; then
  begin dalle
  step $PY -m dalle_train --train-data "$RUN/tokens/train.pt" --val-data "$RUN/tokens/val.pt" --vocab "$RUN/vocab.txt" \
    "${DALLE_ARGS[@]}" --workers 0 --log-every 20 --eval-every 100000 --sample-prompts "${PROMPTS[0]}|${PROMPTS[-1]}" \
    --out-dir "$RUN/dalle"
  mark dalle compute
fi
if ! done_mark clip; then
  begin clip
  step $PY -m clip_train --train-data "$RUN/data/train_clip.csv" --val-data "$RUN/data/val_clip.csv" \
    --val-attributes "$RUN/data/attributes.jsonl" --vocab "$RUN/vocab.txt" --image-size $IMG "${CLIP_ARGS[@]}" \
    --workers 0 --out-dir "$RUN/clip"
  mark clip compute
fi

# --- generate, rerank, measure --------------------------------------------------------------------------------------
if ! done_mark generate; then
  begin generate
  # all prompts in one process per command (one start-up, one model load): prompt i -> gen/p{i}, seeds 1000 i + j
  printf '%s\n' "${PROMPTS[@]}" > "$RUN/prompts.txt"
  step $PY dalle_gen.py "@$RUN/prompts.txt" $N_GEN "$RUN/gen" --checkpoint "$RUN/dalle" --cond-scale $COND_SCALE \
    --top-k $GEN_TOP_K --seed 0 --quiet
  sort_cmd=($PY clip_sort.py "@$RUN/prompts.txt" $N_GEN "$RUN/gen" --scorer "clip:$RUN/clip" --top-k $TOP_K)
  echo; echo "+ ${sort_cmd[*]} > $RUN/ranking.txt"
  "${sort_cmd[@]}" > "$RUN/ranking.txt"
  echo "  ${#PROMPTS[@]} prompts generated and ranked: $RUN/gen/p*/ (rankings: $RUN/ranking.txt)"
  mark generate compute
fi
if ! done_mark eval; then
  # sample quality, offline: the Frechet distance of the judge's penultimate features, generated vs real val images
  # (no FID here: its Inception weights are a download; `--inception-weights FILE` adds FID/KID)
  begin eval
  for g in "${GENERATORS[@]}"; do
    step $PY -m zh_t2i_eval "$RUN/${g#*:}" --real "$RUN/data/val_clip.csv" --judge "$RUN/judge" --no-fid \
      --out "$RUN/eval/${g%%:*}.json"
  done
  mark eval compute
fi
begin report
step $PY -m zh_t2i_demo report "$RUN" --top-k $TOP_K --group-size $GROUP
printf 'report\t%s\tcompute\n' "$(since "$t")" >> "$RUN/timings.tsv"
unset ZH_T2I_STARTUP_LOG  # the table below is not part of any step
echo; echo "== per-step wall time (s) =="
$PY -m zh_t2i_demo steps "$RUN"

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
sample quality              $RUN/eval/*.json   (judge-space Frechet distance vs the real val images)
DONE
