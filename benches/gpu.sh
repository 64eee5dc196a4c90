#!/usr/bin/env bash
# The GPU check of issue 13: one command on a GPU machine that has the packaged CUDA build, the
# repository's files and PyTorch (no Rust toolchain, no network needed). Under 8 minutes on an
# H100 or H200:
#   1. 5 updates of specs/tiny.yaml on the CPU and on cuda:0 in f32 from the same seed, dropout and
#      noise tokens off (their draws differ between the devices by design) and random masks (so
#      the masks do not hang on the teacher's last bits): every update's loss must agree within
#      1e-3 relative. Both are f32; they differ in summation order and in the exp/erf of the
#      fused CPU kernels against candle's CUDA ones (about 1e-6 relative per op, which 5 AdamW
#      steps grow to about 1e-5); an operand taken transposed or a wrong mask shows at 1e-2 or more.
#   2. `ehmam bench-update` of tiny and base on cuda:0, f32 and bf16 (warm-up excluded), and
#      (2b) CTC fine-tuning updates of both (`bench-update --finetune`):
#      ms/update, updates/s, audio s/s, model TFLOP/s and MFU against the chip's dense bf16 peak,
#      device memory (the highest in use at phase boundaries, and nvidia-smi's highest while it ran).
#   3. The same base update in PyTorch (benches/train_reference.py --device cuda, eager, f32 and
#      bf16 autocast) on the same GPU, and ehmam's time over PyTorch's.
#
# Prepare (on the build machine):
#   eval "$(scripts/cuda-toolchain.sh)" && cargo build --release --features cuda && scripts/package-gpu.sh
# then carry target/gpu-package with the repository (the device tool: carry ["target/gpu-package"])
# and run `bash benches/gpu.sh` there. Results: printed, and in $OUT (default target/gpu-check):
# gpu-check.txt and gpu-check.json.
#
# A dry run of the script itself on a machine without a GPU (every step on the CPU, small sizes):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 EHMAM_BIN=target/debug/ehmam bash benches/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
pkg=${PKG:-target/gpu-package}
out=${OUT:-target/gpu-check}
mkdir -p "$out"
log="$out/gpu-check.txt"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
t_start=$(date +%s)

# --- the binary and the CUDA libraries of the machine's PyTorch --------------------------------
py=${PYTHON:-python3}
cu=$("$py" - <<'EOF'
import os
try:
    import nvidia
    # cu13 wheels install into nvidia/cu13/lib; older layouts into nvidia/<name>/lib (curand among them).
    for p in nvidia.__path__:
        for sub in sorted(os.listdir(p)):
            lib = os.path.join(p, sub, "lib")
            if os.path.isdir(lib):
                print(lib)
except Exception:
    pass
EOF
)
export LD_LIBRARY_PATH="$(echo "$cu" | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
if [ -n "${EHMAM_BIN:-}" ]; then
    cp "$EHMAM_BIN" "$work/ehmam"
elif [ -f "$pkg/ehmam.xz" ]; then
    xz -dc "$pkg/ehmam.xz" >"$work/ehmam" 2>/dev/null ||
        "$py" -c "import lzma,sys; sys.stdout.buffer.write(lzma.open('$pkg/ehmam.xz').read())" >"$work/ehmam"
elif [ -x target/release/ehmam ]; then
    cp target/release/ehmam "$work/ehmam"
else
    echo "no $pkg/ehmam.xz (scripts/package-gpu.sh) and no target/release/ehmam" >&2
    exit 1
fi
chmod +x "$work/ehmam"
bin="$work/ehmam"
say "ldd of the binary (CUDA libraries):"
ldd "$bin" | grep -E "cuda|cublas|curand|cudart|nccl|not found" | tee -a "$log"
if ldd "$bin" | grep -q "not found"; then
    echo "missing libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    ldd "$bin" | grep "not found" >&2
    exit 1
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
say "GPU: ${gpu:-none found}; $(date -u +%Y-%m-%d); torch $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo missing)"
# Dense bf16 peak (no sparsity) for MFU: H100/H200 SXM 989 TFLOP/s, H100 PCIe 756; else PEAK_TFLOPS.
case "$gpu" in
    *H100*PCIe*) peak=756 ;;
    *H100* | *H200* | *GH200*) peak=989 ;;
    *) peak=${PEAK_TFLOPS:-0} ;;
esac
peak=${PEAK_TFLOPS:-$peak}
dev=${GPU_CHECK_DEVICE:-cuda:0}
torch_dev=cuda
[ "$dev" = cpu ] && torch_dev=cpu
# Sizes: tiny 8 × 4 s (the CPU benchmark's batch), base 8 × 8 s = 64 s (about the recipe's 62.5 s).
tiny_b=8 tiny_s=4 tiny_n=30 base_b=8 base_s=8 base_n=15 warm=3
if [ -n "${GPU_CHECK_QUICK:-}" ]; then
    tiny_b=2 tiny_s=1 tiny_n=2 base_b=1 base_s=1 base_n=1 warm=1
fi

# Highest nvidia-smi memory.used (MiB) while a command runs.
with_smi_peak() {
    local f="$work/smi.$RANDOM"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$f" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    smi_peak=$(sort -n "$f" | tail -1)
    return $rc
}

# --- 1. CPU against cuda:0 ---------------------------------------------------------------------
say ""
say "== 1. tiny, 5 updates, f32, CPU against $dev (same seed, dropout and noise off, random masks)"
"$bin" run specs/prep.yaml --quiet >>"$log" 2>&1 || { say "prep failed"; exit 1; }
sets=(--set stages.student.with.max_steps=5 --set stages.mask.kind=mask.random
    --set model.encoder.dropout=0.0 --set model.encoder.attention_dropout=0.0
    --set model.head_input_dropout=0.0 --set model.mask_noise_std=0.0
    --set stages.frames.with.every=1000 --force --quiet)
for side in host dev; do
    d=cpu
    [ $side = dev ] && d=$dev
    name=gpucheck-$side
    if ! "$bin" run specs/tiny.yaml --set device=$d --set name=$name "${sets[@]}" >>"$log" 2>&1; then
        say "the run on $d failed (see $log)"
    fi
    "$bin" query --format csv runs/$name "SELECT step, loss FROM steps ORDER BY step" >"$work/$name.csv" 2>>"$log"
done
"$py" - "$work/gpucheck-host.csv" "$work/gpucheck-dev.csv" <<'EOF' | tee -a "$log"
import csv, sys
a = list(csv.DictReader(open(sys.argv[1])))
b = list(csv.DictReader(open(sys.argv[2])))
worst = 0.0
print("step  loss cpu            loss device         relative gap")
for x, y in zip(a, b):
    la, lb = float(x["loss"]), float(y["loss"])
    r = abs(la - lb) / abs(la)
    worst = max(worst, r)
    print(f"{x['step']:>4}  {la:<18.10g}  {lb:<18.10g}  {r:.2e}")
ok = len(a) == len(b) == 5 and worst < 1e-3
print(f"CPU/GPU agreement: {'PASS' if ok else 'FAIL'} (worst {worst:.2e}, tolerance 1e-3, {len(a)}/{len(b)} updates)")
EOF

# --- 2. ehmam on cuda:0 ------------------------------------------------------------------------
say ""
say "== 2. ehmam bench-update on $dev (peak for MFU: ${peak} TFLOP/s bf16 dense)"
json="$out/gpu-check.json"
: >"$json"
bench() { # name model batch seconds updates
    local name=$1 model=$2 batch=$3 secs=$4 n=$5
    if with_smi_peak "$bin" bench-update --device "$dev" --model "$model" --batch "$batch" \
        --seconds "$secs" --updates "$n" --warmup "$warm" --peak-tflops "$peak" --json >"$work/$name.json" 2>>"$log"; then
        "$py" - "$work/$name.json" "$name" "${smi_peak:-0}" <<'EOF' | tee -a "$log"
import json, sys
r = json.load(open(sys.argv[1]))
r["name"] = sys.argv[2]
r["smi_peak_mib"] = float(sys.argv[3] or 0)
mem = (r.get("peak_mem_bytes") or 0) / 2**30
mfu = r.get("mfu")
print(f"{r['name']:<10} {r['ms_per_update']:9.2f} ms  {r['updates_per_s']:7.2f} upd/s  {r['audio_s_per_s']:8.1f} audio s/s  "
      f"{r['tflops_per_s']:6.1f} TFLOP/s  MFU {100 * mfu if mfu is not None else float('nan'):5.1f}%  "
      f"mem {mem:5.1f} GiB (smi {r['smi_peak_mib'] / 1024:5.1f})  phases {','.join(f'{p:.1f}' for p in r['phases_ms'])}")
open(sys.argv[1] + ".named", "w").write(json.dumps(r))
EOF
        cat "$work/$name.json.named" >>"$json"
        echo >>"$json"
    else
        say "$name: bench-update failed (see $log)"
    fi
}
say "name            ms/update      upd/s     audio s/s      TFLOP/s  MFU     memory            phases (teacher,mask,fwd,bwd,opt,metrics)"
bench tiny-f32 "{preset: tiny, dtype: f32}" $tiny_b $tiny_s $tiny_n
bench tiny-bf16 "{preset: tiny, dtype: bf16}" $tiny_b $tiny_s $tiny_n
bench base-f32 "{preset: base, dtype: f32}" $base_b $base_s $base_n
bench base-bf16 "{preset: base, dtype: bf16}" $base_b $base_s $base_n

# --- 2b. CTC fine-tuning updates (issue 19) -----------------------------------------------------
say ""
say "== 2b. CTC fine-tuning updates (bench-update --finetune, f32, encoder not frozen) on $dev"
for m in tiny base; do
    if [ $m = tiny ]; then b=$tiny_b s=$tiny_s n=$tiny_n; else b=$base_b s=$base_s n=$base_n; fi
    if "$bin" bench-update --finetune --device "$dev" --model "{preset: $m}" --batch "$b" --seconds "$s" \
        --updates "$n" --warmup "$warm" --json >"$work/ft-$m.json" 2>>"$log"; then
        "$py" - "$work/ft-$m.json" "$m" "$json" <<'EOF' | tee -a "$log"
import json, sys
r = json.load(open(sys.argv[1]))
r["name"] = f"finetune-{sys.argv[2]}"
print(f"{r['name']:<14} {r['ms_per_update']:9.2f} ms  {r['updates_per_s']:7.2f} upd/s  {r['audio_s_per_s']:8.1f} audio s/s  (batch {r['batch']}, {r['labels_per_utterance']} labels each)")
open(sys.argv[3], "a").write(json.dumps(r) + "\n")
EOF
    else
        say "finetune-$m: bench-update --finetune failed (see $log)"
    fi
done

# --- 3. PyTorch, the same base update on the same GPU ------------------------------------------
say ""
say "== 3. PyTorch (benches/train_reference.py --device $torch_dev), base, $base_b × $base_s s"
for dt in f32 bf16; do
    if with_smi_peak "$py" benches/train_reference.py --preset base --device $torch_dev --dtype $dt \
        --batch $base_b --frames $((base_s * 16000)) --updates $base_n --warmup $warm --threads 2 >"$work/torch-$dt.txt" 2>>"$log"; then
        grep -E "torch_(version|parameters|ms_per_update)" "$work/torch-$dt.txt" | tee -a "$log"
        "$py" - "$work/torch-$dt.txt" "$work/base-$dt.json" "$dt" "${smi_peak:-0}" "$json" <<'EOF' | tee -a "$log"
import json, re, sys
t = open(sys.argv[1]).read()
m = re.search(r"torch_ms_per_update .*?value=([0-9.]+)", t)
try:
    e = json.load(open(sys.argv[2]))
except Exception:
    e = None
if m:
    torch_ms = float(m.group(1))
    line = {"name": f"torch-base-{sys.argv[3]}", "ms_per_update": torch_ms, "smi_peak_mib": float(sys.argv[4] or 0)}
    pm = re.search(r"peak_mem_gib=([0-9.]+)", t)
    if pm:
        line["peak_allocated_gib"] = float(pm.group(1))
    if e:
        line["ehmam_over_torch"] = e["ms_per_update"] / torch_ms
        print(f"base {sys.argv[3]}: ehmam {e['ms_per_update']:.2f} ms, PyTorch {torch_ms:.2f} ms per update: ehmam/PyTorch = {e['ms_per_update'] / torch_ms:.2f}x")
    open(sys.argv[5], "a").write(json.dumps(line) + "\n")
EOF
    else
        say "PyTorch $dt failed (see $log)"
        tail -5 "$work/torch-$dt.txt" | tee -a "$log"
    fi
done
say ""
say "gpu.sh took $(($(date +%s) - t_start)) s; results in $log and $json"
