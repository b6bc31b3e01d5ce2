#!/usr/bin/env bash
# Every GPU measurement of bench/ in one call of a lent GPU machine (15 minutes a session, see
# bench/RESULTS.md): each bench under its own time limit, its Markdown table and log written to
# $OUT, so a bench that overruns costs only its own rows.
#   OUT=/tmp/gpu bash bench/gpu_session.sh            # on the GPU machine
#   OUT=/tmp/gpu DEVICE=cpu SMALL=1 bash bench/gpu_session.sh   # dry run of the script on a CPU
# Sized from the 2026-11-26 H200 session (bench/RESULTS.md): each bench prints its table only at its
# end, so a limit that is too short loses the whole table. The GPU image lacks PyYAML (tests) and
# jsonschema (the start-up bench's training child): carry their cp312 wheels (.whl, see the device README).
set -u
OUT=${OUT:?set OUT to a folder}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "$SMALL" = 1 ]; then
    features=(--images 16 --batch-size 8 --size 224x224 --workers 1)
    spectral=(--voc-images 8 --demo-images 4 --voc-grid 28x28 --batch-size 4)
    train=(--batch-size 2 --iterations 1 --models vit_small_patch16_224)
    startup=(--batch-size 2 --batches 1)
    features_vitb=(--images 8 --batch-size 4 --size 496x368 --workers 1)
else
    features=(--images 4096 --batch-size 256 --size 224x224 --workers 12)
    spectral=(--voc-images 96 --demo-images 16 --voc-grid 28x28 --batch-size 32)  # 46 s
    train=(--batch-size 32 --iterations 8 --num-workers 14 --models vit_base_patch16_224)  # ~20 s each
    startup=(--batch-size 64 --batches 5)
    features_vitb=(--images 1024 --batch-size 64 --size 496x368 --workers 12)
fi

bench() {  # name seconds args...
    local name=$1 seconds=$2
    shift 2
    echo "== $name: python bench/$* ($(date +%T))" | tee -a "$OUT/log.txt"
    timeout "$seconds" python "bench/$@" >"$OUT/$name.md" 2>>"$OUT/log.txt"
    echo "== $name exit $? ($(date +%T))" | tee -a "$OUT/log.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } >"$OUT/log.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_features.py -k "decode" >>"$OUT/log.txt" 2>&1
echo "== decode tests exit $?" | tee -a "$OUT/log.txt"
python -m pytest -q -p no:cacheprovider tests/test_device_views.py -k "equal_the_workers" >>"$OUT/log.txt" 2>&1
echo "== device views tests exit $?" | tee -a "$OUT/log.txt"
bench spectral 90 spectral.py --device "$DEVICE" "${spectral[@]}"
# Is the solver launch-bound at batch 32 (465 img/s on the H200)? The same set in batches of 96.
bench spectral-b96 90 spectral.py --device "$DEVICE" "${spectral[@]}" --batch-size 96
bench features 170 features.py --device "$DEVICE" "${features[@]}"
bench features-vitb 120 features.py --model vit_base_patch16_224.dino --device "$DEVICE" "${features_vitb[@]}"
bench train-pc2m 60 train.py --device "$DEVICE" "${train[@]}"
bench train-vitpcm 60 train.py --method vitpcm --device "$DEVICE" "${train[@]}"
# A cluster's few CPUs per GPU: 4 workers, where rendering the views on the GPU pays most.
bench train-pc2m-4w 60 train.py --device "$DEVICE" "${train[@]}" --num-workers 4
bench startup 60 startup.py --device "$DEVICE" "${startup[@]}"
