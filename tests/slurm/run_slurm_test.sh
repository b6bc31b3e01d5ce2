#!/usr/bin/env bash
# Real SLURM test: bring up a one-node SLURM cluster on localhost (slurmctld + slurmd + munge),
# run the demo pipeline through workflow/profiles/slurm, check its outputs equal a local run's,
# and stop exactly the daemons started here (also on failure).
#
#   bash tests/slurm/run_slurm_test.sh            (as root on Debian/Ubuntu; installs slurm-wlm, munge)
#
# Exit 0 with "SLURM test skipped: <why>" where it cannot run (not root, no apt-get, packages
# unavailable); exit non-zero when the pipeline fails under SLURM or its outputs differ.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
SCRATCH="$(mktemp -d /tmp/slurm-test.XXXXXX)"
PIDS=()

skip() { echo "SLURM test skipped: $*"; exit 0; }
fail() { echo "SLURM test FAILED: $*"; exit 1; }

cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    [ -n "${SLURM_CONF_BACKUP:-}" ] && mv -f "$SLURM_CONF_BACKUP" /etc/slurm/slurm.conf
    [ -z "${SLURM_CONF_BACKUP:-}" ] && [ "${WROTE_SLURM_CONF:-0}" = 1 ] && rm -f /etc/slurm/slurm.conf
    echo "stopped daemons: ${PIDS[*]:-none}"
    exit "$rc"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || skip "needs root to install and start slurmctld/slurmd/munged"
command -v apt-get >/dev/null || skip "no apt-get to install slurm-wlm and munge"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurm-wlm munge >"$SCRATCH/apt.log" 2>&1 \
        || { apt-get update >>"$SCRATCH/apt.log" 2>&1 \
             && apt-get install -y --no-install-recommends slurm-wlm munge >>"$SCRATCH/apt.log" 2>&1; } \
        || skip "apt-get could not install slurm-wlm and munge (see $SCRATCH/apt.log)"
fi
python -c "import snakemake_executor_plugin_slurm" 2>/dev/null \
    || python -m pip install -q "snakemake-executor-plugin-slurm>=2.8" \
    || skip "cannot install snakemake-executor-plugin-slurm"

# --- munge ---------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    setsid su -s /bin/sh munge -c "exec /usr/sbin/munged --foreground" >"$SCRATCH/munged.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n | unmunge | grep -q Success || fail "munge does not work (see $SCRATCH/munged.log)"

# --- slurm ---------------------------------------------------------------------------------
mkdir -p /etc/slurm "$SCRATCH"/{state,spool,log}
if [ -e /etc/slurm/slurm.conf ]; then
    SLURM_CONF_BACKUP="$SCRATCH/slurm.conf.orig"; cp /etc/slurm/slurm.conf "$SLURM_CONF_BACKUP"
fi
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 2048 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=pipelinetest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
WROTE_SLURM_CONF=1
setsid /usr/sbin/slurmctld -D -f /etc/slurm/slurm.conf >"$SCRATCH/slurmctld.out" 2>&1 &
PIDS+=($!)
setsid /usr/sbin/slurmd -D -N localhost -f /etc/slurm/slurm.conf >"$SCRATCH/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.5; done
sinfo -h -o %T | grep -qx idle || fail "the SLURM node never became idle (logs in $SCRATCH/log)"
echo "SLURM up: $(sinfo -h -o '%P %D %c %m %T')"

# --- the pipeline, through SLURM and locally -----------------------------------------------
cat > "$SCRATCH/tiny.yaml" <<YAML
dataset: {images_per_shard: 6, demo: {n_train: 8, n_val: 4, width: 96, height: 80}}
backbone: {model_kwargs: {depth: 2, embed_dim: 48, num_heads: 3}}
features: {batch_size: 4, num_workers: 0}
train: {epochs: 2, global_size: 64, local_size: 32, batch_size: 4, num_workers: 0}
predict: {max_size: 96, num_workers: 0}
YAML
run_pipeline() {  # $1 = work dir, rest = extra snakemake arguments
    local work="$1"; shift
    mkdir -p "$work"
    (cd "$work" && python -m snakemake -s "$REPO/Snakefile" --configfile "$SCRATCH/tiny.yaml" \
        --config results="$work/results" "$@")
}
run_pipeline "$SCRATCH/slurm" --workflow-profile "$REPO/workflow/profiles/slurm" \
    --default-resources slurm_partition=debug "mem_mb=2000" "runtime=30" \
    --set-resources extract_features:slurm_partition=debug extract_features:gpu=0 \
        segment_features:slurm_partition=debug segment_features:gpu=0 \
        train_model:slurm_partition=debug train_model:gpu=0 predict_model:slurm_partition=debug predict_model:gpu=0 \
    --slurm-no-account --slurm-status-command squeue --slurm-init-seconds-before-status-checks 2 \
    --jobs 4 --cores "$CPUS" >"$SCRATCH/slurm-run.log" 2>&1 \
    || { tail -50 "$SCRATCH/slurm-run.log"; fail "the pipeline failed under SLURM (log: $SCRATCH/slurm-run.log)"; }
echo "SLURM job ids of the stages:"
grep -E "submitted with SLURM jobid|SLURM run ID|jobid [0-9]+" "$SCRATCH/slurm-run.log" | sed 's/^/  /' | head -40
grep -q "SLURM jobid" "$SCRATCH/slurm-run.log" || fail "no job was submitted to SLURM"

run_pipeline "$SCRATCH/local" --cores 2 >"$SCRATCH/local-run.log" 2>&1 \
    || { tail -30 "$SCRATCH/local-run.log"; fail "the local reference run failed"; }

# Same outputs: every artifact byte for byte, except what records where or how long a run took:
# text files are compared with the results folder's path replaced (the manifest holds absolute
# paths), training histories without their seconds column, the index's shard lists without their
# file signatures (each run generated its own demo images, with their own mtimes), model files
# tensor by tensor; run records (done.json) and resume state (checkpoints) are not results and are
# left out.
python - "$SCRATCH/slurm/results" "$SCRATCH/local/results" <<'PY' || fail "outputs of the SLURM run differ from the local run"
import io, sys
from pathlib import Path

import pandas as pd
import torch

slurm, local = (Path(p) for p in sys.argv[1:])
SKIP_DIRS = {"logs", "benchmarks", "checkpoints"}
# Run records and resume state, not results: wall-clock times, RNG states of the last process.
SKIP_NAMES = {"done.json", "checkpoint.pt"}
TIMED = {"history.csv": "seconds"}


def files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()
                  and not SKIP_DIRS & set(p.relative_to(root).parts) and p.name not in SKIP_NAMES
                  and not p.name.startswith("."))


def text(path, root):
    return path.read_text(encoding="utf-8").replace(str(root), "<results>")


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in tensors(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    return []


def same(rel):
    a, b = slurm / rel, local / rel
    column = TIMED.get(rel.name) or ("signature" if rel.parent.name == "shards" and rel.suffix == ".csv" else None)
    if column:
        drop = lambda f: f.drop(columns=[c for c in f.columns if c == column])
        return drop(pd.read_csv(a)).replace(str(slurm), "<results>", regex=True).equals(
            drop(pd.read_csv(b)).replace(str(local), "<results>", regex=True))
    if rel.suffix == ".pt":
        ta = tensors(torch.load(a, weights_only=True))
        tb = tensors(torch.load(b, weights_only=True))
        return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    if rel.suffix in {".csv", ".json", ".md", ".txt"}:
        return text(a, slurm) == text(b, local)
    return a.read_bytes() == b.read_bytes()


names_slurm, names_local = files(slurm), files(local)
if names_slurm != names_local:
    print("different sets of files:", sorted(set(map(str, names_slurm)) ^ set(map(str, names_local))))
    sys.exit(1)
differ = [str(rel) for rel in names_local if not same(rel)]
for rel in differ:
    print("  differs:", rel)
print(f"compared {len(names_local)} output files")
sys.exit(1 if differ else 0)
PY
echo "SLURM test passed: the SLURM run's outputs equal the local run's"
rm -rf "$SCRATCH/slurm/results" "$SCRATCH/local/results"
