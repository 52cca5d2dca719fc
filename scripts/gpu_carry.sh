#!/usr/bin/env bash
# Builds .gpu-carry/ (git-ignored): what the lent GPU machine lacks for scripts/gpu_bench.sh,
# within the device tool's 64 MiB limit (working tree plus carried paths). That machine has
# Python 3.12 with torch (CUDA), transformers, tokenizers, safetensors, grpcio, protobuf, but no
# diffusers, no Triton and no registry access, and its numpy is 2.x, which Triton 2.51's python
# stub misreads. So this carries:
#   tritonserver.tar.xz  Triton 2.51 from the nvidia-pytriton wheel, trimmed to the server, its
#                        libraries, the python backend and the stub for Python 3.12. libpython 3.13
#                        (for the 3.13 stub) is left out, and ICU's 29 MB data library is replaced
#                        by an empty one: tritonserver links libxml2 -> ICU but converts no text.
#   site.tar.xz          numpy 1.26.4, diffusers, tritonclient with the grpcio, protobuf,
#                        python-rapidjson and ml-dtypes versions it needs, installed for CPython
#                        3.12 x86-64 (tests folders dropped); unpacked first on PYTHONPATH there.
# Usage: scripts/gpu_carry.sh [PYTHON_VERSION]   (3.12 for the H200 machine; 3.11 to try it here)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
if [ -z "${PIP:-}" ]; then
  if [ -x .venv/bin/python ]; then PIP=".venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
fi
CARRY=${CARRY:-.gpu-carry}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CARRY"

PLATFORMS="--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
TARGET="--no-deps --only-binary=:all: --python-version $PY --implementation cp $PLATFORMS"
# versions: pyproject.toml's pins, and tritonclient's own requirements
PACKAGES="numpy==1.26.4 diffusers==0.42.1 tritonclient==2.73.0 grpcio==1.85.3 protobuf==6.33.6
  python-rapidjson==1.25 ml-dtypes==0.5.4"
TRITON_WHEEL=nvidia-pytriton==0.7.0

echo "downloading wheels for CPython $PY ..."
$PIP download -q $TARGET -d "$WORK/wheels" $PACKAGES $TRITON_WHEEL

echo "site packages ..."
$PIP install -q $TARGET --no-compile --target "$WORK/site" $(ls "$WORK"/wheels/*.whl | grep -v nvidia_pytriton)
find "$WORK/site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
tar -C "$WORK/site" -cf - . | xz -6 -T0 > "$CARRY/site.tar.xz"

echo "tritonserver ..."
unzip -q "$WORK"/wheels/nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$WORK/wheel"
SRC="$WORK/wheel/pytriton/tritonserver"
LIBS="$WORK/wheel/nvidia_pytriton.libs"
DEST="$WORK/trimmed/tritonserver"
mkdir -p "$DEST/bin" "$DEST/lib" "$DEST/backends/python"
cp "$SRC/bin/tritonserver" "$DEST/bin/"
cp "$SRC/backends/python/libtriton_python.so" "$SRC/backends/python/triton_python_backend_utils.py" "$DEST/backends/python/"
cp "$SRC/python_backend_stubs/$PY/triton_python_backend_stub" "$DEST/backends/python/"
for lib in "$LIBS"/*; do
  case "$(basename "$lib")" in
    libpython3-*) ;;  # the 3.13 stub's libpython; the 3.12 stub links the machine's own
    libicudata-*)
      # ICU's data entry point with no data (libicuuc needs the symbol, nothing reads it)
      printf 'const unsigned char icudt70_dat[64] __attribute__((aligned(16))) = {0};\n' > "$WORK/icudata.c"
      gcc -shared -fPIC -O2 -Wl,-soname,"$(basename "$lib")" -o "$DEST/lib/$(basename "$lib")" "$WORK/icudata.c" ;;
    *) cp "$lib" "$DEST/lib/" ;;
  esac
done
tar -C "$WORK/trimmed" -cf - tritonserver | xz -6 -T0 > "$CARRY/tritonserver.tar.xz"

du -b "$CARRY"/*.tar.xz
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb "$CARRY"/*.tar.xz | tail -1 | cut -f1)
echo "carry $((carry / 1048576)) MiB + tracked tree $((tree / 1048576)) MiB = $(((carry + tree) / 1048576)) MiB (limit 64 MiB)"
