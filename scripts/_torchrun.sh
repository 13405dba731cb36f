# Shared by the scripts/train_*.sh launchers: `launch <python package> <args...>` under torchrun.
PY=${PYTHON:-python}
default_nproc() {
  $PY -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1
}
launch() {
  local pkg=$1; shift
  local nproc=${NPROC:-$(default_nproc)}
  exec $PY -m torch.distributed.run \
    --nproc_per_node="$nproc" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    -m "$pkg" "$@"
}
