#!/usr/bin/env bash
# Start tcsched in the Triton container: build the TensorRT engines this GPU lacks, then exec tritonserver.
#
# Engines are valid for one GPU architecture (compute capability) and one TensorRT release, and are compiled
# from this image's ONNX variants, so the volume holds one repository per triple:
# $TCSCHED_ENGINE_DIR/cc<cc>-trt<version>-<hash of the CPU manifest>/model_repository. The first start on a GPU
# builds it (minutes: every variant, then profiling); later starts find it and start at once
# (`tcsched engines --if-missing` also checks its manifest against this GPU). Extra arguments go to tritonserver.
#
# Security (README "Security"): the container listens on 0.0.0.0 (publish its ports deliberately), and the admin
# API groups shared-memory (CVE-2025-23319), model-repository, logging and trace answer only requests with the
# header `tcsched-admin-key: $TCSCHED_ADMIN_KEY` (gRPC: `triton-grpc-protocol-tcsched-admin-key`); without
# TCSCHED_ADMIN_KEY the key is random and printed nowhere, so they are closed to everyone.
# TCSCHED_OPEN_APIS=shared-memory,... (or `all`) opens groups to every client.
set -euo pipefail

cpu_repo="${TCSCHED_CPU_REPO:-/opt/tcsched/model_repository_cpu}"
engine_dir="${TCSCHED_ENGINE_DIR:-/engines}"
graphs="${TCSCHED_CUDA_GRAPHS:-1}"
case "${graphs}" in
  1) graphs_flag="--cuda-graphs" ;;
  0) graphs_flag="--no-cuda-graphs" ;;
  *) echo "tcsched: TCSCHED_CUDA_GRAPHS must be 1 or 0, got '${graphs}'" >&2; exit 2 ;;
esac

# the whole GPU stack (tensorrt, cuda-python, a CUDA GPU) is checked before any work, naming what is missing
gpu_key="$(python3 -c 'import sys
from tcsched.build_tools.tensorrt_engine import check_gpu_dependencies, gpu_identity
try:
    check_gpu_dependencies()
    name, cc, version = gpu_identity()
except (ImportError, RuntimeError) as e:
    sys.exit(f"tcsched: {e}")
print(f"cc{cc}-trt{version}")')" || {
  echo "tcsched: no usable GPU/TensorRT in this container (run it with --gpus / nvidia.com/gpu)" >&2
  exit 1
}
# the key names everything the repository depends on: GPU architecture, TensorRT, the CUDA-graph setting (it is
# written into every variant's config.pbtxt) and the CPU build; another value of any of them is another folder
key="${gpu_key}-graphs${graphs}-$(sha256sum "${cpu_repo}/manifest.json" | cut -c1-12)"
repo="${engine_dir}/${key}/model_repository"
mkdir -p "${engine_dir}/${key}"

# one builder at a time per key (replicas sharing a volume); flock is util-linux, present in the image.
# The timing cache is per GPU + TensorRT only: a new image's variants reuse the tactic timings of the last.
flock "${engine_dir}/${key}/.build.lock" \
  tcsched engines --cpu-repo "${cpu_repo}" --output "${repo}" \
    --timing-cache "${engine_dir}/timing-${gpu_key}.cache" "${graphs_flag}" --if-missing

# the admin API restriction (tritonserver 2.51 --http-restricted-api / --grpc-restricted-protocol)
admin_apis="shared-memory model-repository logging trace"
open_apis=",${TCSCHED_OPEN_APIS:-},"
if [[ "${open_apis}" == ",all," ]]; then open_apis=",${admin_apis// /,},"; fi
restricted=()
for api in ${admin_apis}; do
  if [[ "${open_apis}" != *",${api},"* ]]; then restricted+=("${api}"); fi
done
requested="${TCSCHED_OPEN_APIS:-}"
for api in ${requested//,/ }; do
  if [[ "${api}" != "all" && " ${admin_apis} " != *" ${api} "* ]]; then
    echo "tcsched: TCSCHED_OPEN_APIS: unknown group '${api}' (expected all or some of: ${admin_apis})" >&2
    exit 2
  fi
done
admin_key="${TCSCHED_ADMIN_KEY:-$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')}"
if [[ ! "${admin_key}" =~ ^[!-~]{16,}$ ]]; then
  echo "tcsched: TCSCHED_ADMIN_KEY must be >= 16 printable ASCII characters without spaces" >&2
  exit 2
fi
restrict_args=()
if (( ${#restricted[@]} )); then
  groups="$(IFS=,; echo "${restricted[*]}")"
  restrict_args=("--http-restricted-api=${groups}:tcsched-admin-key=${admin_key}"
                 "--grpc-restricted-protocol=${groups}:tcsched-admin-key=${admin_key}")
  echo "tcsched: admin APIs ${groups}: header tcsched-admin-key required"
fi
if [[ -n "${requested}" ]]; then echo "tcsched: open to every client: ${requested}"; fi
unset TCSCHED_ADMIN_KEY

# Python-backend regions left in this /dev/shm by a previous run (a killed server, or a stub that died, leaves
# them; a pod's /dev/shm volume outlives container restarts). Only this container's tritonserver uses them.
rm -f "${TCSCHED_SHM_DIR:-/dev/shm}"/triton_python_backend_shm_region_*

exec tritonserver \
  --model-repository="${repo}" \
  --http-address=0.0.0.0 --grpc-address=0.0.0.0 --metrics-address=0.0.0.0 \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true --allow-gpu-metrics=true \
  --strict-readiness=true --exit-on-error=true \
  --exit-timeout-secs="${TCSCHED_EXIT_TIMEOUT_S:-5}" \
  ${restrict_args[@]+"${restrict_args[@]}"} \
  "$@"
