#!/usr/bin/env bash
# Every GPU measurement of bench/ in one call of a lent GPU machine (15 minutes a session, see
# bench/RESULTS.md): each bench under its own time limit, its Markdown table and log written to
# $OUT, so a bench that overruns costs only its own rows.
#   OUT=/tmp/gpu bash bench/gpu_session.sh            # on the GPU machine
#   OUT=/tmp/gpu DEVICE=cpu SMALL=1 bash bench/gpu_session.sh   # dry run of the script on a CPU
# Sized from the 2026-11-26 and 2026-11-27 H200 sessions (bench/RESULTS.md): each bench prints its
# table only at its end, so a limit that is too short loses the whole table. All parts together can
# take ~13 minutes, more than one call's 10 and most of a session's 15: name the PARTS a call needs. The GPU image lacks jsonschema (with
# jsonschema-specifications, referencing, rpds-py: the start-up bench's training child) and POT
# (tests/test_pc2m.py, imported by the device-view tests), and may lack PyYAML: carry their cp312
# wheels (.whl, see the device README; 35 MB together).
#   PARTS="tests spectral train" OUT=... bash bench/gpu_session.sh      # only these parts
#   PROFILE="train-pc2m spectral" ...   # also torch.profiler's tables of these benches (bench/profiling.py)
# A call brings back at most 8 files from $OUT: every table goes to results.md, every profile to
# profiles.txt, the logs to log.txt. The parts run in order of importance, so a call cut short at
# its limit loses the least.
set -u
OUT=${OUT:?set OUT to a folder}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
PARTS=${PARTS:-tests train spectral features decode-cost segments lstm startup train-4w features-vitb}  # + features-ab (OLD=...)
PROFILE=${PROFILE:-}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ "$SMALL" = 1 ]; then
    features=(--images 16 --batch-size 8 --size 224x224 --workers 1 --naive-images 4 --weights random-file)
    spectral=(--voc-images 8 --demo-images 4 --voc-grid 28x28 --batch-size 4)
    spectral_big=(--voc-images 8 --demo-images 0 --voc-grid 28x28 --batch-size 8 --no-eigh)
    spectral_b32=(--voc-images 8 --demo-images 4 --voc-grid 28x28 --batch-size 8 --no-eigh --subspace-block 32)
    train=(--batch-size 2 --iterations 1 --models vit_small_patch16_224)
    variants=(--compile off)
    lstm=(--batch-size 2 --calls 1)
    startup=(--batch-size 2 --batches 1 --plain-exit)
    features_vitb=(--images 8 --batch-size 4 --size 496x368 --workers 1 --naive-images 2 --weights random-file)
    decode_images=64
else
    # JPEGs written in parallel, (c) timed on 256 images: ~60 s on the H200 (2026-11-27).
    # Random weights from a file, loaded as a real run loads DINO's: no random initialisation in the stage (since
    # 2026-11-27; the earlier GPU rows built random models, 0.6-1.3 s of the whole stage).
    features=(--images 8192 --batch-size 256 --size 224x224 --workers 12 --naive-images 256 --weights random-file)
    spectral=(--voc-images 96 --demo-images 16 --voc-grid 28x28 --batch-size 32)  # 47 s on the H200
    # Batches of 96 (launch-bound at 32?), with the default block (48: Rayleigh-Ritz eigensolves
    # on the host) and with 32 (they stay on the GPU, one more round), the hard set included.
    spectral_big=(--voc-images 96 --demo-images 0 --voc-grid 28x28 --batch-size 96 --no-eigh)
    spectral_b32=(--voc-images 96 --demo-images 16 --voc-grid 28x28 --batch-size 96 --no-eigh --subspace-block 32)
    # 24 steps: 8 were too few for a steady free-running rate (2026-11-27). ~60 s each; compile on
    # adds ~20 s of compiling.
    train=(--batch-size 32 --iterations 24 --num-workers 14 --models vit_base_patch16_224)
    variants=(--compile off on)
    lstm=(--batch-size 32 --calls 10)
    startup=(--batch-size 64 --batches 5 --plain-exit)  # six children: ~60 s
    features_vitb=(--images 2048 --batch-size 64 --size 496x368 --workers 12 --naive-images 64 --weights random-file)  # ~35 s
fi

bench() {  # name seconds args...: the table appended to results.md, stderr to log.txt
    local name=$1 seconds=$2
    shift 2
    local profile=()
    [[ " $PROFILE " == *" $name "* ]] && profile=(--profile "$OUT/profiles.txt")
    echo "== $name: python bench/$* ($(date +%T))" | tee -a "$OUT/log.txt"
    printf '\n## %s: `python bench/%s`\n\n' "$name" "$*" >>"$OUT/results.md"
    timeout "$seconds" python "bench/$@" "${profile[@]}" >>"$OUT/results.md" 2>>"$OUT/log.txt"
    echo "== $name exit $? ($(date +%T))" | tee -a "$OUT/log.txt"
}

wants() { [[ " $PARTS " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } >>"$OUT/log.txt" 2>&1
if wants tests; then
    # nvjpeg decode, a packed batch, and train.compile's inductor kernels against the eager blocks.
    python -m pytest -q -p no:cacheprovider tests/test_features.py tests/test_compile_precision.py \
        -k "decode or two_tensors or inductor" >>"$OUT/log.txt" 2>&1
    echo "== decode tests exit $?" | tee -a "$OUT/log.txt"
    # test_device_views imports test_pc2m, which needs POT (carried as a wheel).
    python -m pytest -q -p no:cacheprovider tests/test_device_views.py \
        -k "equal_the_workers" >>"$OUT/log.txt" 2>&1
    echo "== device views tests exit $?" | tee -a "$OUT/log.txt"
fi
if wants train; then
    bench train-pc2m 100 train.py --device "$DEVICE" "${train[@]}" "${variants[@]}"
    bench train-vitpcm 120 train.py --method vitpcm --device "$DEVICE" "${train[@]}" "${variants[@]}" \
        --lstm-precision float32 bfloat16
fi
if wants spectral; then
    bench spectral 70 spectral.py --device "$DEVICE" "${spectral[@]}"
    bench spectral-b96 45 spectral.py --device "$DEVICE" "${spectral_big[@]}"
    bench spectral-b96-block32 50 spectral.py --device "$DEVICE" "${spectral_b32[@]}"
fi
if wants features; then
    bench features 110 features.py --device "$DEVICE" "${features[@]}"
fi
if wants decode-cost; then
    # What one DataLoader worker of this machine's CPUs delivers per decoder (~20 s): with the
    # features part's rates, how many workers a GPU needs for decode: workers.
    bench decode-cost 60 decode_cost.py --images "${decode_images:-2048}" --size 224x224
fi
if wants segments; then
    # The spectral stage's per-image k-means on this machine's cores (~15 s): with the solver's GPU
    # rate, what bounds the spectral stage there.
    bench segments 60 segments.py --images 48 --busy 0 4
fi
if wants lstm; then
    bench lstm 30 lstm.py --device "$DEVICE" "${lstm[@]}"
fi
if wants startup; then
    bench startup 120 startup.py --device "$DEVICE" "${startup[@]}"
fi
if wants train-4w; then
    # A cluster's few CPUs per GPU: 4 workers, where rendering the views on the GPU pays most.
    bench train-pc2m-4w 60 train.py --device "$DEVICE" "${train[@]}" --num-workers 4
fi
if wants features-vitb; then
    bench features-vitb 60 features.py --model vit_base_patch16_224.dino --device "$DEVICE" "${features_vitb[@]}"
fi
if wants features-ab; then
    # This checkout's feature stage against an older one's (OLD: its folder, carried as an ignored path, e.g.
    # `git worktree add devtmp/old b74a28e` for the writer thread's A/B), each in a fresh process on the same
    # JPEGs, cold then two warm runs: JSON lines in results.md.
    OLD=${OLD:?features-ab needs OLD, the older checkout}
    ab=("$OUT/jpegs" --images "${features[1]}" --size 224x224 --device "$DEVICE" --weights random-file
        --batch-size "${features[3]}" --workers "${features[7]}" --warm-runs 2)
    python bench/features_ab.py --write-jpegs "${ab[@]}" 2>>"$OUT/log.txt"
    # decode: workers (libjpeg in the workers, no nvjpeg) too, each in a fresh process: (e) of the
    # features part runs warm after (a), so only this compares the two decoders fairly.
    for round in 1 2; do
        bench "features-ab-new-$round" 60 features_ab.py --label new "${ab[@]}"
        bench "features-ab-workers-$round" 60 features_ab.py --label new-workers --decode workers "${ab[@]}"
        bench "features-ab-old-$round" 60 features_ab.py --repo "$OLD" --label old "${ab[@]}"
    done
    rm -rf "$OUT/jpegs"
fi
