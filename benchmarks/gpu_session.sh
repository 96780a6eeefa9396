#!/bin/bash
# The GPU checks, as one prepared script for a short lease of one NVIDIA GPU (H100 / H200).
#
#   bash benchmarks/gpu_session.sh smoke OUT   # ~1 min: kernels, a bf16 DiT step, the :runlocal main job
#   bash benchmarks/gpu_session.sh full OUT    # ~8 min: the measurements below, results under OUT
#
# full:
#   1. benchmarks/gpu_attention.py: cuDNN flash attention against XLA (agreement, speed);
#   2. benchmarks/train_step.py: bf16 train steps of the S, B, L and 1.5B DiTs at the flagship's
#      1,280 tokens (5 x 32 x 32 latents, patch 2), FLOP/s over an in-process bf16 matmul peak;
#      B also with XLA attention;
#   3. then, sharing the GPU until DEADLINE seconds (default 540): the main job (experiments/shapes.py)
#      with its stage times, the reconstruction-quality VAE run (experiments/vae_shapes.py), and
#      optionally ablations on the main job's VAE and latent cache (ABLATIONS="eps v factorised").
#      On 2026-11-26 phase 2 had 211 s: the main job's three training stages took 174 s beside five
#      other processes and its sample stage did not finish; give phase 2 at least 300 s.
# The machine has no network: missing packages travel as wheels in .whl/ (see benchmarks/README.md).
set -u
MODE=${1:-smoke}
OUT=${2:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=python3
LOG=$OUT/log.txt
{
  date; nvidia-smi -L
  $PY -c "import jax, flax, optax, orbax.checkpoint as o, grain, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'grain', grain.__version__, jax.devices())"
} >> "$LOG" 2>&1

if [ "$MODE" = smoke ]; then
  timeout 60 $PY benchmarks/gpu_attention.py --quick >> "$LOG" 2>&1; echo "attention rc $?" >> "$LOG"
  timeout 60 $PY benchmarks/train_step.py --variant=mu --batch=2 --frames=2 --latent=8 --repeats=2 \
      --dtype=bfloat16 --peak_dtype=bfloat16 --peak_n=4096 >> "$LOG" 2>&1; echo "train_step rc $?" >> "$LOG"
  timeout 120 $PY -m pixeldance.main --config=experiments/shapes.py:runlocal --workdir=/tmp/smoke >> "$LOG" 2>&1
  echo "runlocal rc $?" >> "$LOG"
  cp /tmp/smoke/timing.json "$OUT/smoke_timing.json" 2>/dev/null
  tail -n 30 "$LOG"
  exit 0
fi

# ---- full ----
# Phase 1, alone on the GPU: kernel and train-step timings.
timeout 120 $PY benchmarks/gpu_attention.py --output=$OUT/gpu_attention.jsonl >> "$LOG" 2>&1
echo "attention rc $? at ${SECONDS}s" >> "$LOG"
PK="--dtype=bfloat16 --peak_dtype=bfloat16 --peak_n=8192 --repeats=10 --frames=5 --latent=32"
for args in "--variant=S --batch=32" "--variant=B --batch=16" "--variant=B --batch=16 --attention_impl=xla" \
            "--variant=1.5B --batch=4"; do
  timeout 60 $PY benchmarks/train_step.py $args $PK --output=$OUT/gpu_train_step.jsonl >> "$LOG" 2>&1
  echo "train_step $args rc $? at ${SECONDS}s" >> "$LOG"
done
# Phase 2, sharing the GPU until the deadline (seconds since the start; leave time to pack up):
# the long VAE runs, the main job, then the ablations on the main job's VAE and latent cache.
LEFT=$(( ${DEADLINE:-540} - SECONDS - 25 ))
echo "phase 2: ${LEFT}s" >> "$LOG"
W=/tmp/w
mkdir -p $W
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several processes share the GPU
( timeout $LEFT $PY -m pixeldance.main --config=experiments/vae_shapes.py --workdir=$W/vae_shapes \
    --config.data.num_workers=6 > $W/vae_shapes.log 2>&1;
  echo "vae_shapes rc $? at ${SECONDS}s" >> "$LOG" ) &
( timeout $LEFT $PY -m pixeldance.main --config=experiments/shapes.py --workdir=$W/shapes > $W/shapes.log 2>&1
  echo "shapes rc $? at ${SECONDS}s" >> "$LOG" ) &
for i in $(seq 1 $LEFT); do [ -e $W/shapes/latent_stats.json ] && [ -e $W/shapes/cache/meta.json ] && break; sleep 1; done
for name in ${ABLATIONS:-}; do   # e.g. ABLATIONS="eps v factorised"
  d=$W/abl_$name; mkdir -p $d
  cp -r $W/shapes/vae $W/shapes/cache $W/shapes/latent_stats.json $W/shapes/vae_model.json $d/ 2>/dev/null
  ( LEFT2=$(( ${DEADLINE:-540} - SECONDS - 25 ));
    timeout $LEFT2 $PY -m pixeldance.main --config=experiments/shapes_$name.py --workdir=$d --config.mode=train_dit > $d/log.txt 2>&1 &&
    timeout $(( ${DEADLINE:-540} - SECONDS - 25 )) $PY -m pixeldance.main --config=experiments/shapes_$name.py --workdir=$d --config.mode=sample >> $d/log.txt 2>&1
    echo "abl_$name rc $? at ${SECONDS}s" >> "$LOG" ) &
done
wait
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$LOG" 2>&1
# Small files back (at most 8 files from OUT): stage times, reports, metrics, logs.
cd $W && tar czf "$OUT/runs.tgz" --exclude='*/cache' --exclude='*/dit' --exclude='*/vae' --exclude='*/samples/*.mp4' \
    --exclude='*/tensorboard' . 2>> "$LOG"
ls -la "$OUT" >> "$LOG"
tail -n 40 "$LOG"
