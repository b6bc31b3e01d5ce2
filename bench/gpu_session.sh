#!/usr/bin/env bash
# Every GPU measurement of bench/ in one call of a lent GPU machine (15 minutes a session, see
# bench/RESULTS.md): each bench under its own time limit, its Markdown table and log written to
# $OUT, so a bench that overruns costs only its own rows.
#   OUT=/tmp/gpu bash bench/gpu_session.sh            # on the GPU machine
#   OUT=/tmp/gpu DEVICE=cpu SMALL=1 bash bench/gpu_session.sh   # dry run of the script on a CPU
# Sized from the 2026-11-26 H200 session (bench/RESULTS.md): each bench prints its table only at its
# end, so a limit that is too short loses the whole table. The GPU image lacks PyYAML (tests) and
# jsonschema (the start-up bench's training child): carry their cp312 wheels (.whl, see the device README).
#   PARTS="tests spectral train" OUT=... bash bench/gpu_session.sh      # only these parts
#   PROFILE=1 ...                       # also torch.profiler's tables (bench/profiling.py)
# A call brings back at most 8 files from $OUT: every table goes to results.md, every profile to
# profiles.txt, the logs to log.txt.
set -u
OUT=${OUT:?set OUT to a folder}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
PARTS=${PARTS:-tests spectral features train startup}
PROFILE=${PROFILE:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "$SMALL" = 1 ]; then
    features=(--images 16 --batch-size 8 --size 224x224 --workers 1)
    spectral=(--voc-images 8 --demo-images 4 --voc-grid 28x28 --batch-size 4)
    spectral_big=(--voc-images 8 --demo-images 0 --voc-grid 28x28 --batch-size 8 --no-eigh)
    train=(--batch-size 2 --iterations 1 --models vit_small_patch16_224)
    startup=(--batch-size 2 --batches 1)
    features_vitb=(--images 8 --batch-size 4 --size 496x368 --workers 1)
else
    features=(--images 2048 --batch-size 256 --size 224x224 --workers 12)
    spectral=(--voc-images 96 --demo-images 16 --voc-grid 28x28 --batch-size 32)  # 46 s
    # Is the solver launch-bound at batch 32 (465 img/s on the H200)? The same kind of set in batches of 96.
    spectral_big=(--voc-images 192 --demo-images 0 --voc-grid 28x28 --batch-size 96 --no-eigh)
    train=(--batch-size 32 --iterations 8 --num-workers 14 --models vit_base_patch16_224)  # ~20 s each
    startup=(--batch-size 64 --batches 5)
    features_vitb=(--images 1024 --batch-size 64 --size 496x368 --workers 12)
fi

bench() {  # name seconds args...: the table appended to results.md, stderr to log.txt
    local name=$1 seconds=$2
    shift 2
    local profile=()
    [ "$PROFILE" = 1 ] && profile=(--profile "$OUT/profiles.txt")
    echo "== $name: python bench/$* ($(date +%T))" | tee -a "$OUT/log.txt"
    printf '\n## %s: `python bench/%s`\n\n' "$name" "$*" >>"$OUT/results.md"
    timeout "$seconds" python "bench/$@" "${profile[@]}" >>"$OUT/results.md" 2>>"$OUT/log.txt"
    echo "== $name exit $? ($(date +%T))" | tee -a "$OUT/log.txt"
}

wants() { [[ " $PARTS " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } >>"$OUT/log.txt" 2>&1
if wants tests; then
    python -m pytest -q -p no:cacheprovider tests/test_features.py -k "decode" >>"$OUT/log.txt" 2>&1
    echo "== decode tests exit $?" | tee -a "$OUT/log.txt"
    python -m pytest -q -p no:cacheprovider tests/test_device_views.py -k "equal_the_workers" >>"$OUT/log.txt" 2>&1
    echo "== device views tests exit $?" | tee -a "$OUT/log.txt"
fi
if wants spectral; then
    bench spectral 90 spectral.py --device "$DEVICE" "${spectral[@]}"
    bench spectral-b96 60 spectral.py --device "$DEVICE" "${spectral_big[@]}"
fi
if wants features; then
    bench features 120 features.py --device "$DEVICE" "${features[@]}"
fi
if wants features-vitb; then
    bench features-vitb 120 features.py --model vit_base_patch16_224.dino --device "$DEVICE" "${features_vitb[@]}"
fi
if wants train; then
    bench train-pc2m 60 train.py --device "$DEVICE" "${train[@]}"
    bench train-vitpcm 60 train.py --method vitpcm --device "$DEVICE" "${train[@]}"
fi
if wants train-4w; then
    # A cluster's few CPUs per GPU: 4 workers, where rendering the views on the GPU pays most.
    bench train-pc2m-4w 60 train.py --device "$DEVICE" "${train[@]}" --num-workers 4
fi
if wants startup; then
    bench startup 60 startup.py --device "$DEVICE" "${startup[@]}"
fi
