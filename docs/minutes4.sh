#!/bin/bash
# Issue 28's check: `python train.py --dataset mnist --minutes 4` started while two other training
# runs go on for its first minute ends within 5% of 4 minutes, with at least half the steps it
# takes alone. Run it on a machine with nothing else running: bash minutes4.sh  (about 9 minutes)
set -u
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-4}; BUSY_S=${BUSY_S:-60}  # smaller only to check the script works
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
timed() {  # $1: out folder. Prints "seconds steps".
    local start=$(date +%s.%N)
    python train.py --dataset mnist --minutes "$MINUTES" --out "$1" --overwrite 2> "$1.err" >/dev/null
    local end=$(date +%s.%N)
    tr '\r' '\n' < "$1.err" > "$1.lines"  # the progress bar's updates end in \r
    grep -q '^done: ' "$1.lines" || { tail -3 "$1.lines" >&2; exit 1; }
    echo "$(echo "$end - $start" | bc) $(grep -o '^done: [0-9]*' "$1.lines" | grep -o '[0-9]*')"
}
read alone_s alone_steps < <(timed "$TMP/alone") || exit 1
for i in 0 1; do
    python train.py --dataset mnist --steps 1000000 --ckpt-every 1000000 --sample-every 1000000 \
        --out "$TMP/peer$i" --overwrite >/dev/null 2>&1 &
done
peers=$(jobs -p)
(sleep "$BUSY_S"; kill $peers) &
read busy_s busy_steps < <(timed "$TMP/busy") || exit 1
grep "sized to" "$TMP/busy.lines"
echo "alone:            $alone_s s, $alone_steps steps"
echo "first minute busy: $busy_s s, $busy_steps steps"
python -c "
a, s, b, n, m = $alone_s, $alone_steps, $busy_s, $busy_steps, 60 * $MINUTES
ok = abs(b - m) <= 0.05 * m and n >= s / 2
print(f'ends {100 * (b - m) / m:+.1f}% from $MINUTES minutes, {n / s:.0%} of the steps alone:',
      'PASS' if ok else 'FAIL')"
