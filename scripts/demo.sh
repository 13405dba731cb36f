#!/usr/bin/env bash
# The main job on the embedded synthetic data set, run the way a user runs it: every step prints its command.
# Data part: synthetic raw Wukong-style CSV + images on a loopback HTTP server -> clean -> download -> export -> vocab.
# A second run reuses finished steps; FRESH=1 starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUN=${RUN_DIR:-runs/demo}
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
[ "${FRESH:-0}" = 1 ] && rm -rf "$RUN"
mkdir -p "$RUN"

step() { echo; echo "+ $*"; "$@"; }
done_mark() { [ -f "$RUN/.done-$1" ]; }
mark() { touch "$RUN/.done-$1"; }

PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if ! done_mark raw; then
  step $PY -m form_data synth --raw --out "$RUN/raw" --base-url "http://127.0.0.1:$PORT" --n 3000 && mark raw
fi
# The raw CSV names the port it was made with; serve on that one.
PORT=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_url"].rsplit(":",1)[1])' "$RUN/raw/expected.json")

if ! done_mark clean; then
  step $PY -m form_data clean "$RUN/raw/wukong_raw.csv" --keywords "$RUN/raw/keywords.txt" --out "$RUN/clean" \
    && mark clean
fi

if ! done_mark download; then
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
  step $PY -m form_data download "$RUN/clean" --out "$RUN/data" --encode-format png --threads 16 && mark download
  kill $SERVER 2>/dev/null || true
fi

if ! done_mark export; then
  step $PY -m form_data export "$RUN/data" --webdataset && mark export
fi

if ! done_mark vocab; then
  step $PY -m form_data vocab "$RUN/data/train_clip.csv" --out "$RUN/vocab.txt" && mark vocab
fi

cat <<DONE

== demo data ready ==
raw Wukong-style CSV      $RUN/raw/wukong_raw.csv   (keywords: $RUN/raw/keywords.txt)
cleaned splits            $RUN/clean/{train,val}.csv   report: $RUN/clean/clean_report.json
downloaded images         $RUN/data/{train,val}/   report: $RUN/data/download_report.json
open_clip CSV             $RUN/data/{train,val}_clip.csv
DALLE JSONL               $RUN/data/{train,val}_dalle.jsonl
BriVL JSONL               $RUN/data/{train,val}_brivl.jsonl
webdataset shards         $RUN/data/wds/
vocab                     $RUN/vocab.txt
DONE
