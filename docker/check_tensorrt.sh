#!/usr/bin/env bash
# Fail unless this image's TensorRT is one release everywhere: the server's libnvinfer (what Triton's TensorRT
# backend loads engines with), the tensorrt Python package (what `tcsched engines` builds them with) and the
# expected version (the Dockerfile's TENSORRT_VERSION). Engines do not load on another TensorRT release.
#
#   check_tensorrt.sh 10.5.0
#
# Compares major.minor.patch. No libnvinfer.so.<version> found is a failure too: then nothing was checked.
# TCSCHED_LIBNVINFER_DIRS (space-separated) overrides the folders searched.
set -euo pipefail

expected="${1:?usage: check_tensorrt.sh TENSORRT_VERSION (e.g. 10.5.0)}"
dirs="${TCSCHED_LIBNVINFER_DIRS:-/usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/local/tensorrt/lib}"

release() {  # major.minor.patch of a version string
  local IFS=.
  read -r -a parts <<<"$1"
  echo "${parts[0]:-}.${parts[1]:-}.${parts[2]:-}"
}

lib=""
for d in ${dirs}; do
  for f in "${d}"/libnvinfer.so.[0-9]*.[0-9]*.[0-9]*; do
    if [[ -e "${f}" ]]; then lib="${f}"; break 2; fi
  done
done
if [[ -z "${lib}" ]]; then
  echo "TensorRT check failed: no libnvinfer.so.<version> in ${dirs}; the server's TensorRT is unknown" >&2
  exit 1
fi
libver="${lib##*/libnvinfer.so.}"
if ! pyver="$(python3 -c 'import tensorrt; print(tensorrt.__version__)')"; then
  echo "TensorRT check failed: the tensorrt Python package does not import" >&2
  exit 1
fi
echo "libnvinfer: ${lib} (${libver}); tensorrt (Python): ${pyver}; expected: ${expected}"
want="$(release "${expected}")"
if [[ "$(release "${libver}")" != "${want}" || "$(release "${pyver}")" != "${want}" ]]; then
  echo "TensorRT mismatch: server ${libver}, Python ${pyver}, expected ${expected}:" \
       "set --build-arg TENSORRT_VERSION to the server's (${libver})" >&2
  exit 1
fi
