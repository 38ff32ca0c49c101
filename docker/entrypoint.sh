#!/usr/bin/env bash
# Start tcsched in the Triton container: build the TensorRT engines this GPU lacks, then exec tritonserver.
#
# Engines are valid for one GPU architecture (compute capability) and one TensorRT release, and are compiled
# from this image's ONNX variants, so the volume holds one repository per triple:
# $TCSCHED_ENGINE_DIR/cc<cc>-trt<version>-<hash of the CPU manifest>/model_repository. The first start on a GPU
# builds it (minutes: every variant, then profiling); later starts find it and start at once
# (`tcsched engines --if-missing` also checks its manifest against this GPU). Extra arguments go to tritonserver.
set -euo pipefail

cpu_repo="${TCSCHED_CPU_REPO:-/opt/tcsched/model_repository_cpu}"
engine_dir="${TCSCHED_ENGINE_DIR:-/engines}"
if [[ "${TCSCHED_CUDA_GRAPHS:-1}" == "1" ]]; then graphs_flag="--cuda-graphs"; else graphs_flag="--no-cuda-graphs"; fi

gpu_key="$(python3 -c 'from tcsched.build_tools.tensorrt_engine import gpu_identity
name, cc, version = gpu_identity()
print(f"cc{cc}-trt{version}")')" || {
  echo "tcsched: no usable GPU/TensorRT in this container (run it with --gpus / nvidia.com/gpu)" >&2
  exit 1
}
key="${gpu_key}-$(sha256sum "${cpu_repo}/manifest.json" | cut -c1-12)"
repo="${engine_dir}/${key}/model_repository"
mkdir -p "${engine_dir}/${key}"

# one builder at a time per key (replicas sharing a volume); flock is util-linux, present in the image.
# The timing cache is per GPU + TensorRT only: a new image's variants reuse the tactic timings of the last.
flock "${engine_dir}/${key}/.build.lock" \
  tcsched engines --cpu-repo "${cpu_repo}" --output "${repo}" \
    --timing-cache "${engine_dir}/timing-${gpu_key}.cache" "${graphs_flag}" --if-missing

exec tritonserver \
  --model-repository="${repo}" \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true --allow-gpu-metrics=true \
  --strict-readiness=true --exit-on-error=true \
  "$@"
