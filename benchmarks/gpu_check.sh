#!/usr/bin/env bash
# The GPU checks of issues 12 and 15 as one prepared run, for a machine lent with a CUDA GPU.
# Its step timeouts add up to 9 minutes, under the device tool's 10 minutes per call; it has not
# been run on a GPU yet. Run from the project root; every step writes its output to $OUT
# (default benchmarks/results/gpu) and a failing step does not stop the others.
#
# On the `device` machine (ray is not installed there; see ../shared/tools/device-bundle.sh):
#   ../shared/tools/device-bundle.sh                 # here, once: .device/ with ray, 40 CamVid
#                                                    # frames (repeated to 1600 images), ESPNet
#   run: source .device/setup.sh && bash benchmarks/gpu_check.sh      (carry: [".device"])
#
# Steps:
#   1. the GPU tests: CUDA vs CPU statistics, evaluation rows, label-free features, adapters;
#   2. benchmarks/metrics.py: the statistics on CUDA against our CPU figure (goal >= 20x);
#   3. benchmarks/evaluate.py --profile on CUDA (goal >= 200 image x calibrator evaluations/s at
#      Cityscapes stride 4);
#   4. benchmarks/extract.py, ESPNet on CamVid frames, store_stride 4 (goal >= 600 images/s),
#      once with one actor per GPU and once with two (extract.actors_per_gpu).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
camvid=${DEVICE_CAMVID:-${CAMVID_ROOT:-}}
weights=${DEVICE_ESPNET:-${SEGCAL_ESPNET_WEIGHTS:-}}
images=${GPU_CHECK_IMAGES:-1600}

step() {  # step NAME TIMEOUT_S COMMAND...: run one check, keep its output and exit code
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt" || exit 2

step tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/metrics/test_torch_stats.py tests/test_evaluate_device.py tests/test_label_free.py \
  tests/models/test_model_adapters.py
step metrics 90 "$PY" benchmarks/metrics.py --repeat 3
step evaluate 90 "$PY" benchmarks/evaluate.py --profile --device cuda --images 64
if [ -n "$camvid" ] && [ -n "$weights" ]; then
  for k in 1 2; do
    step "extract_actors$k" 120 "$PY" benchmarks/extract.py --model espnet --device cuda \
      --stride 4 --images "$images" --actors-per-gpu "$k" --data "$camvid" --weights "$weights"
  done
else
  echo "== extract: skipped (set DEVICE_CAMVID/CAMVID_ROOT and DEVICE_ESPNET/SEGCAL_ESPNET_WEIGHTS)"
fi
