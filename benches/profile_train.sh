#!/usr/bin/env bash
# Op-level profile of one EH-MAM update (issue 12), both sides:
#   ehmam:   `perf record` over the train bench's update child (release build, the same update
#            `cargo bench --bench train` times), its heaviest functions by self time;
#   PyTorch: the reference's own profiler (benches/train_reference.py --profile), its heaviest ops.
# The phase split (teacher, mask, forward, backward, optimiser, metrics) is in the bench's table.
#
#   benches/profile_train.sh [THREADS] [UPDATES]      (defaults: 1 thread, 20 updates)
#
# perf needs kernel.perf_event_paranoid <= 2 (the default) and no container seccomp veto; where it
# cannot run, the script says so and still prints PyTorch's side.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
updates=${2:-20}

exe=$(cargo bench --bench train --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "train" and m.get("executable"):
        print(m["executable"])')
if [ -z "$exe" ]; then
    echo "could not build the train bench (cargo bench --bench train --no-run)" >&2
    exit 1
fi

echo "== ehmam: perf over $updates updates at $threads thread(s) ($exe --update $updates)"
data=target/perf-train.data
if command -v perf >/dev/null && RAYON_NUM_THREADS=$threads perf record -q -F 2000 -o "$data" "$exe" --update "$updates" >target/perf-train.out 2>&1; then
    grep '^UPDATE' target/perf-train.out || true
    perf report -i "$data" --no-children --sort symbol --percent-limit 0.7 2>/dev/null |
        grep -E '^ +[0-9]' | sed -E 's/ +- +- *$//; s/\[\.\] //' | cut -c1-150
else
    echo "perf is not available or not permitted here; the bench's phase table is the breakdown."
fi

echo
echo "== PyTorch: torch.profiler over $updates updates at $threads thread(s)"
python3 benches/train_reference.py --threads "$threads" --updates "$updates" --profile 25 2>/dev/null |
    grep -v '^torch_parameters\|^torch_shapes'
