#!/usr/bin/env bash
# Issue 4's GPU throughput check, for one GPU machine without network access:
# ViT-B-32, bf16 autocast, global batch 1024 on one GPU, 200 steps, measured twice:
#   1. synthetic: our training step on random tensors already on the GPU (no data loading);
#   2. ours: Ray Train + Ray Data ingest from Parquet shards of 256 px photo-like JPEGs.
# Target: ours >= 1,400 samples/s on an H200 (850 on an A100 in the OpenCLIP scaling-law
# runs, H100/A100 ~ 1.67).
#
# Run from anywhere, with the wheels that machine lacks in .whl/ at the repo root:
#   bash benchmarks/gpu_check.sh
# Everything is logged to $OUT/gpu_check.log ($OUT defaults to ./gpu_check_out), with
# synthetic.json, ingest.json and nvidia-smi samples beside it. Knobs (environment): STEPS,
# BATCH, MODEL, ROWS, IMAGE_SIZE, CPUS_PER_WORKER, DATA_CPUS_PER_TASK, SYNTHETIC_TIMEOUT,
# INGEST_TIMEOUT, PLAIN=1 (also the plain DataLoader loop, last; PLAIN_TIMEOUT), WHEELS and
# SITE (where the wheels are and go), USE_GPU=0 (the same flow on the CPU, to test this script:
# USE_GPU=0 MODEL=clip-demo-tiny STEPS=3 BATCH=32 ROWS=512 IMAGE_SIZE=96 CPUS_PER_WORKER=1).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"

STEPS=${STEPS:-200}
BATCH=${BATCH:-1024}
MODEL=${MODEL:-ViT-B-32}
ROWS=${ROWS:-20480} # 20 shards of 1,024 rows: 20 steps an epoch, ~10 epochs in 200 steps
IMAGE_SIZE=${IMAGE_SIZE:-256}
CPUS=$(nproc)
CPUS_PER_WORKER=${CPUS_PER_WORKER:-2} # the training worker; Ray Data decodes on the rest
DATA_CPUS_PER_TASK=${DATA_CPUS_PER_TASK:-1}
SYNTHETIC_TIMEOUT=${SYNTHETIC_TIMEOUT:-180}
INGEST_TIMEOUT=${INGEST_TIMEOUT:-300}
PLAIN_TIMEOUT=${PLAIN_TIMEOUT:-240}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
GPU_FLAG=(--use-gpu)
[ "${USE_GPU:-1}" = 0 ] && GPU_FLAG=()

export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SITE

phase() { echo; echo "=== $(date +%H:%M:%S) $*"; }

filtered() { # filtered CMD...: CMD's output less Ray Train's polling noise; CMD's exit status
    "$@" 2>&1 | grep --line-buffered -v "PlacementGroupCleaner"
    return "${PIPESTATUS[0]}"
}

sample_gpu() { # sample_gpu FILE: nvidia-smi every second until killed; prints its pid
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
        --format=csv,noheader,nounits -l 1 >"$1" 2>/dev/null &
    echo $!
}

gpu_summary() { # gpu_summary LABEL FILE
    python3 - "$1" "$2" <<'EOF'
import sys
label, path = sys.argv[1:]
rows = []
for line in open(path):
    parts = [p.strip() for p in line.split(",")]
    try:
        rows.append((float(parts[1]), float(parts[2])))
    except (IndexError, ValueError):
        pass
if rows:
    busy = [u for u, _ in rows if u > 0] or [0.0]
    print(f"nvidia-smi ({label}): {len(rows)} samples, GPU util mean {sum(busy) / len(busy):.0f}% "
          f"over samples with util > 0, max memory used {max(m for _, m in rows) / 1024:.1f} GiB")
EOF
}

main() {
    phase "install the carried wheels into $SITE"
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "FATAL: no wheels in $WHEELS: name .whl in the run's carry list"
        return 2
    fi
    ls "$WHEELS"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl; then
        echo "FATAL: pip could not install $WHEELS/*.whl into $SITE"
        return 2
    fi
    export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}

    phase "machine"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    echo "CPUs: $CPUS"
    free -g | head -2
    df -h /dev/shm /tmp 2>/dev/null
    python3 - <<'EOF'
import importlib, importlib.metadata, os, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for dist, module in (("torchvision", "torchvision"), ("numpy", "numpy"), ("pandas", "pandas"),
                     ("pyarrow", "pyarrow"), ("pillow", "PIL"), ("timm", "timm"),
                     ("huggingface_hub", "huggingface_hub"), ("protobuf", "google.protobuf"),
                     ("grpcio", "grpc"), ("packaging", "packaging"), ("attrs", "attrs"),
                     ("typing_extensions", "typing_extensions"), ("pydantic", "pydantic"),
                     ("ray", "ray"), ("open_clip_torch", "open_clip"), ("tensorboardX", "tensorboardX"),
                     ("ftfy", "ftfy"), ("jsonschema", "jsonschema")):
    try:
        m = importlib.import_module(module)
        where = "carried" if os.environ["SITE"] in (getattr(m, "__file__", "") or "") else "machine"
        print(f"  {dist:18} {importlib.metadata.version(dist):14} {where}")
    except Exception as e:
        print(f"  {dist:18} IMPORT FAILED: {type(e).__name__}: {e}")
EOF

    phase "import smoke test"
    local ray_ok=1
    if ! timeout 120 python3 -c "
import open_clip, open_clip_train.scheduler, pipeline.train.loop, pipeline.train.contrastive
from pipeline.train.modeling import model_config, create_model
print('pipeline.train.loop imports; $MODEL vision_cfg', model_config('$MODEL')['vision_cfg'])
"; then
        echo "FATAL: pipeline.train.loop or open_clip does not import: nothing can be measured"
        return 3
    fi
    if ! timeout 120 python3 -c "
import ray, ray.data, ray.train, ray.train.torch, ray.tune, tensorboardX
from ray.train.torch import TorchTrainer
print('ray', ray.__version__, 'imports with data, train, tune')
"; then
        echo "ERROR: ray does not import: the synthetic figure only"
        ray_ok=0
    fi

    local common=("${GPU_FLAG[@]}" --model "$MODEL" --batch "$BATCH" --steps "$STEPS" --cpus "$CPUS")
    local rc_syn rc_ing=skipped rc_plain=skipped smi

    phase "1/2 synthetic: $MODEL, batch $BATCH, $STEPS steps on random tensors (limit ${SYNTHETIC_TIMEOUT}s)"
    smi=$(sample_gpu "$OUT/smi_synthetic.csv")
    filtered timeout -k 15 "$SYNTHETIC_TIMEOUT" python3 benchmarks/bench_train.py --synthetic "${common[@]}" \
        --cpus-per-worker "$CPUS_PER_WORKER" --json "$OUT/synthetic.json"
    rc_syn=$?
    kill "$smi" 2>/dev/null
    echo "synthetic exit status: $rc_syn"

    if [ "$ray_ok" = 1 ]; then
        phase "2/2 ours: Ray Train + Ray Data from $ROWS rows of ${IMAGE_SIZE} px JPEGs (limit ${INGEST_TIMEOUT}s)"
        local baseline=()
        [ -s "$OUT/synthetic.json" ] && baseline=(--baseline "$OUT/synthetic.json")
        smi=$(sample_gpu "$OUT/smi_ingest.csv")
        filtered timeout -k 20 "$INGEST_TIMEOUT" python3 benchmarks/bench_train.py "${common[@]}" \
            --workers 1 --rows "$ROWS" --image-size "$IMAGE_SIZE" \
            --cpus-per-worker "$CPUS_PER_WORKER" --data-cpus-per-task "$DATA_CPUS_PER_TASK" \
            --skip-plain --log-to-driver "${baseline[@]}" --json "$OUT/ingest.json"
        rc_ing=$?
        kill "$smi" 2>/dev/null
        echo "ours exit status: $rc_ing"
        if [ "$rc_ing" != 0 ]; then
            # Ray's own logs say why a worker died or hung; capped at 15 MiB.
            tar -czf "$OUT/ray_logs.tgz" -C "${RAY_TMPDIR:-/tmp}/ray/session_latest" logs 2>/dev/null
            [ -f "$OUT/ray_logs.tgz" ] && [ "$(stat -c %s "$OUT/ray_logs.tgz")" -gt 15000000 ] &&
                rm -f "$OUT/ray_logs.tgz" && echo "(Ray logs too large to keep)"
        fi
    fi

    if [ "${PLAIN:-0}" = 1 ]; then
        phase "extra: plain DataLoader loop on the same shards (limit ${PLAIN_TIMEOUT}s)"
        local baseline=()
        [ -s "$OUT/synthetic.json" ] && baseline=(--baseline "$OUT/synthetic.json")
        filtered timeout -k 15 "$PLAIN_TIMEOUT" python3 benchmarks/bench_train.py "${common[@]}" \
            --workers 1 --rows "$ROWS" --image-size "$IMAGE_SIZE" \
            --cpus-per-worker "$CPUS_PER_WORKER" --skip-ours "${baseline[@]}" \
            --json "$OUT/plain.json"
        rc_plain=$?
    fi

    phase "summary"
    [ -s "$OUT/smi_synthetic.csv" ] && gpu_summary synthetic "$OUT/smi_synthetic.csv"
    [ -s "$OUT/smi_ingest.csv" ] && gpu_summary ours "$OUT/smi_ingest.csv"
    python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else {}
syn, ing, plain = load("synthetic.json"), load("ingest.json"), load("plain.json")
first = syn or ing or plain
if first:
    print(f"model {first['model']}, global batch {first['global_batch']}, {first['steps']} steps, "
          f"{first['precision']}, {first.get('device', '?')}")
s = syn.get("synthetic", {}).get("samples_per_second")
o = ing.get("ours", {}).get("samples_per_second")
p = plain.get("plain", {}).get("samples_per_second")
fmt = lambda v: f"{v:8.1f} samples/s" if v else "     n/a"
print(f"synthetic (no data loading) : {fmt(s)}")
print(f"Ray Train + Ray Data ingest : {fmt(o)}")
if p:
    print(f"plain DataLoader loop       : {fmt(p)}")
if o and s:
    print(f"ratio ours/synthetic        : {o / s:8.2f}")
if o:
    print(f"data-wait fraction (ours)   : {ing['ours']['data_wait_fraction']:8.1%}")
    print(f"target >= 1,400 samples/s   : {'MET' if o >= 1400 else 'NOT MET'} (ours)")
for label, d in (("synthetic", syn.get("synthetic", {})), ("plain", plain.get("plain", {}))):
    if "peak_gpu_memory_gib" in d:
        print(f"peak GPU memory ({label:9}) : {d['peak_gpu_memory_gib']:8.1f} GiB (torch)")
EOF
    echo "exit status: synthetic $rc_syn, ours $rc_ing, plain $rc_plain"
    [ "$rc_syn" = 0 ] && { [ "$rc_ing" = 0 ] || [ "$rc_ing" = skipped ]; }
}

main 2>&1 | tee "$OUT/gpu_check.log"
