#!/bin/bash
# The median training step of `train.py --dataset mnist` (the CPU default) alone and beside one
# and two other training runs, under three thread settings:
#   spin     GOMP_SPINCOUNT=300000: libgomp's default without a wait policy (the scripts as they were)
#   passive  OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0: sleep at once
#   short    GOMP_SPINCOUNT=10000, and shorter, GOMP_SPINCOUNT=1000 (what the scripts set before
#            torch is imported, beside OMP_WAIT_POLICY=PASSIVE for other OpenMP runtimes): a
#            short spin, then sleep
#   1thread  OMP_NUM_THREADS=1 (with passive): fewer threads, as a busy machine might want
# Every process of a cell (the timed run and its peers) runs under the cell's setting. Run it on
# a machine with nothing else running: bash contention.sh  (STEPS=40: about 12 minutes)
set -u
cd "$(dirname "$0")/.."
STEPS=${STEPS:-200}
SETTINGS=${SETTINGS:-"spin passive shorter 1thread"}; PEERS=${PEERS:-"0 1 2"}  # fewer: only to check it works
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
declare -A ENVS=([spin]="GOMP_SPINCOUNT=300000" [passive]="OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0"
                 [short]="GOMP_SPINCOUNT=10000" [shorter]="GOMP_SPINCOUNT=1000"
                 [1thread]="OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1")
median_step() {  # $1: the setting; $2: the number of peers. Prints the median seconds a step.
    local peers=()
    for ((i = 0; i < $2; i++)); do
        env ${ENVS[$1]} python train.py --dataset mnist --steps 1000000 --ckpt-every 1000000 \
            --sample-every 1000000 --num-samples 1 --out "$TMP/peer$i" --overwrite >/dev/null 2>&1 &
        peers+=($!)
    done
    [ $2 -gt 0 ] && sleep 20  # the peers past their start
    env ${ENVS[$1]} python train.py --dataset mnist --steps "$STEPS" --log-every 1 \
        --ckpt-every 1000000 --sample-every 1000000 --num-samples 1 --out "$TMP/timed" --overwrite >/dev/null 2>&1
    for p in "${peers[@]}"; do kill "$p"; wait "$p" 2>/dev/null; done
    python - "$TMP/timed/log.jsonl" <<'PY'
import json, statistics, sys
times = [json.loads(line)["time_s"] for line in open(sys.argv[1]) if '"loss"' in line]
gaps = [b - a for a, b in zip(times, times[1:])][10:]   # the first steps warm up
print(f"{statistics.median(gaps):.3f}")
PY
}
printf "%-10s %10s %10s %10s\n" setting alone "+1 run" "+2 runs"
for setting in $SETTINGS; do
    row=()
    for peers in $PEERS; do row+=("$(median_step $setting $peers)"); done
    printf "%-10s %9ss %9ss %9ss\n" "$setting" "${row[@]}"
done
