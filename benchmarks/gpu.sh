#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, with a Python that has jax[cuda], vggjax's requirements and
# PyTorch (CUDA):
#
#   bash benchmarks/gpu.sh [OUTDIR] [PARTS]
#
# PARTS, comma-separated; they run in this order, the most telling first (default: all but
# tests, which may take 15 minutes alone):
#   train  train step and inference next to PyTorch eager and torch.compile, the eval_dense
#          throughput, VGG19's step (about 5 minutes)
#   fed    `python -m vggjax.main` on 1,024 generated JPEGs against the synthetic step rate
#          (train_e2e.py; issue 11 item 4); not yet run on a GPU, time unknown
#   sweep  issue 11 item 1's candidates, one train step process each (VGG16, bfloat16, batch
#          128): the default (unless the train part ran it), with its optimised HLO in
#          OUTDIR/step.hlo (transposes, copies and cuDNN calls counted in its JSON line), then
#          four XLA flags, then conv1_1 on 4 and 8 channels; about 45 s a variant (not yet run)
#   eval   dense evaluation from an empty compilation cache, from a warm one, and a PyTorch eager
#          loop (eval_cold_start.py; issue 12); not yet run on a GPU, time unknown
#   tests  the test suite on the GPU (test_multihost.py excepted: it starts CPU processes of four
#          fake devices each, by design); the pytest summary goes to OUTDIR/tests.txt
# Each benchmark's JSON line goes to OUTDIR/results.jsonl as it finishes.
set -u
out=${1:-/tmp/vggjax-gpu}
parts=,${2:-train,fed,sweep,eval},
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/machine.txt"
$py -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$out/machine.txt"
# VGG16's bfloat16 train step at batch 128, issue 11's setting, as the train and sweep parts run it.
step=(benchmarks/train_step.py --model=D --batch_size=128 --dtype=bfloat16 --steps=20 --peak_tflops=989)
bench() {
  echo "+ $*"
  "$@" 2>>"$out/stderr.log" | tail -n 1 | tee -a "$out/results.jsonl"
}
if [[ $parts == *,train,* ]]; then
  # MFU against the dense bfloat16 peak of the H100/H200 SXM: 989 TFLOP/s.
  # PyTorch eager and torch.compile (default mode), channels-last, cudnn.benchmark, TF32 for
  # float32; JAX's ratio is against the stronger of the two.
  # Issue 11's criterion first: bfloat16 at batch 128.
  for run in "bfloat16 128" "float32 64"; do
    read -r dtype batch <<<"$run"
    bench $py benchmarks/torch_train_step.py --model=D --batch_size=$batch --dtype=$dtype --steps=10 --rounds=2 \
      --torch_channels_last --torch_compile=both
  done
  bench $py "${step[@]}" --hlo_out="$out/step.hlo"
  bench $py benchmarks/eval_dense.py --model=D --num_images=256 --batch_size=32 --scales=256,384,512 --dtype=bfloat16
  bench $py benchmarks/train_step.py --model=E --batch_size=128 --dtype=bfloat16 --steps=20 --peak_tflops=989
fi
if [[ $parts == *,fed,* ]]; then
  # VGG16 bfloat16, batch 128, one grain worker per core: is the GPU fed (>= 0.9 of synthetic)?
  bench $py benchmarks/train_e2e.py --model=D --dtype=bfloat16 --batch_size=128 --train_steps=200
fi
if [[ $parts == *,sweep,* ]]; then
  # A flag a newer XLA no longer knows stops that process at once (its line is then missing).
  [[ $parts == *,train,* ]] || bench $py "${step[@]}" --hlo_out="$out/step.hlo"  # the default
  for flag in --xla_gpu_enable_command_buffer= --xla_gpu_enable_triton_gemm=false \
    --xla_gpu_use_runtime_fusion=true --xla_gpu_force_conv_nhwc=true; do
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" bench $py "${step[@]}"
  done
  for pad in 4 8; do  # conv1_1's 3 input channels zero-padded (vggjax/convolution.py)
    bench $py "${step[@]}" --rgb_pad=$pad
  done
fi
if [[ $parts == *,eval,* ]]; then
  # Issue 12's setting: VGG16, bfloat16, Q = 256, 384, 512 with flips, 1,024 images of sides
  # 300–500; then the same with coarser buckets (fewer programs to compile, more padding).
  bench $py benchmarks/eval_cold_start.py --model=D --num_images=1024 --batch_size=32 \
    --scales=256,384,512 --dtype=bfloat16
  bench $py benchmarks/eval_cold_start.py --model=D --num_images=1024 --batch_size=32 \
    --scales=256,384,512 --dtype=bfloat16 --buckets_per_octave=4
fi
if [[ $parts == *,tests,* ]]; then
  # Default settings: tests/conftest.py pins float32 matmul precision on a GPU by itself.
  echo "+ pytest tests (JAX_PLATFORMS=cuda)"
  JAX_PLATFORMS=cuda timeout 900 $py -m pytest tests -q --ignore=tests/test_multihost.py 2>&1 \
    | tail -n 40 | tee "$out/tests.txt"
fi
