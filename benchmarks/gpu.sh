#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run (about 5 minutes on one H100 or H200), with a Python
# that has jax[cuda], vggjax's requirements and PyTorch (CUDA):
#
#   bash benchmarks/gpu.sh [OUTDIR]
#
# Each benchmark's JSON line goes to OUTDIR/results.jsonl as it finishes.
set -u
out=${1:-/tmp/vggjax-gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/machine.txt"
$py -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$out/machine.txt"
bench() {
  echo "+ $*"
  "$@" 2>>"$out/stderr.log" | tail -n 1 | tee -a "$out/results.jsonl"
}
# Most telling first. MFU against the dense bfloat16 peak of the H100/H200 SXM: 989 TFLOP/s.
for dtype in float32 bfloat16; do
  bench $py benchmarks/torch_train_step.py --model=D --batch_size=64 --dtype=$dtype --steps=10 --rounds=2
done
bench $py benchmarks/train_step.py --model=D --batch_size=128 --dtype=bfloat16 --steps=20 --peak_tflops=989
bench $py benchmarks/eval_dense.py --model=D --num_images=256 --batch_size=32 --scales=256,384,512 --dtype=bfloat16
bench $py benchmarks/train_step.py --model=E --batch_size=128 --dtype=bfloat16 --steps=20 --peak_tflops=989
bench $py benchmarks/eval_dense.py --model=D --num_images=256 --batch_size=32 --scales=256,384,512
