#!/usr/bin/env bash
# One evaluation on N local devices: N processes of tools/eval.py, shard I on device I.
#
#   tools/eval_shards.sh 8 --model_dir=runs/imagenet/r50 --num_steps=10,20,50 --batch_size=128
#   python tools/eval.py --model_dir=runs/imagenet/r50 --num_steps=10,20,50 --batch_size=128 --merge
#
# Each process sees one GPU (CUDA_VISIBLE_DEVICES=I), evaluates the examples whose index is I mod N
# into <output>/shard-I-of-N and logs to $LOG_DIR/shard-I-of-N.log (default: eval_logs). A shard
# that dies is named at the end; rerun this script (finished shards return at once, the others
# resume), then merge. On N machines, run `tools/eval.py ... --shard=I/N` on machine I instead
# (docs/evaluation.md). No scheduling of its own: each shard is one plain process. The processes
# inherit KERAS_BACKEND; JAX on GPUs honours CUDA_VISIBLE_DEVICES as TensorFlow does.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N <tools/eval.py flags, without --shard>" >&2
  exit 2
fi
count=$1
shift
python=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
logs=${LOG_DIR:-eval_logs}
mkdir -p "$logs"

pids=()
for ((i = 0; i < count; i++)); do
  CUDA_VISIBLE_DEVICES=$i "$python" "$here/eval.py" "$@" --shard="$i/$count" \
    >"$logs/shard-$i-of-$count.log" 2>&1 &
  pids+=($!)
done

failed=()
for ((i = 0; i < count; i++)); do
  wait "${pids[$i]}" || failed+=("$i/$count (see $logs/shard-$i-of-$count.log)")
done
"$python" "$here/eval.py" "$@" --status
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}; rerun the same command to resume them." >&2
  exit 1
fi
echo "All $count shards done: merge with the same flags and --merge."
