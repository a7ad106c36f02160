#!/usr/bin/env bash
# Builds the llama.cpp benchmark peer: a venv of its own at benchmarks/peers/.venv-llamacpp holding
# llama-cpp-python built from its sdist for this CPU (GGML_NATIVE, no BLAS, no GPU backends).
# Idempotent: does nothing when the pinned version, built with these flags, is already installed there.
# AMX is left out (-mno-amx-*): ggml's AMX kernels, built by GCC 12, die with SIGILL on their first tile load
# (the compiler drops the stores that fill the tile config; llama.cpp PR 26954). AVX-512/VNNI/BF16 stay native.
#   bash benchmarks/peers/setup_llamacpp.sh        (PYTHON=/path/to/python3.11 to choose the interpreter)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
PINS=(numpy==2.3.5 diskcache==5.6.3 jinja2==3.1.6 markupsafe==3.0.4 typing-extensions==4.12.2)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv-llamacpp"

for tool in cmake c++ cc; do
  command -v "$tool" >/dev/null || { echo "setup_llamacpp: '$tool' not found: install cmake and a C/C++ compiler (apt-get install cmake g++)" >&2; exit 1; }
done

# The same interpreter that made the project's venv, else python3.11 on PATH.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
  else
    PYTHON="$(command -v python3.11)"
  fi
fi

CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
STAMP="$VENV/.llamacpp-build"
BUILD="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION $CMAKE_ARGS CFLAGS=$NO_AMX"

installed() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true; }

if [[ -x "$VENV/bin/python" && "$(installed)" == "$LLAMA_CPP_PYTHON_VERSION" && "$(cat "$STAMP" 2>/dev/null)" == "$BUILD" ]]; then
  echo "setup_llamacpp: llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already in $VENV ($(cat "$STAMP"))"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -m pip uninstall --quiet --yes llama-cpp-python 2>/dev/null || true  # other version or flags
rm -f "$STAMP"

# CPU-only build tuned to this host; built from source, never from a cached wheel of other flags.
export CMAKE_ARGS CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
start=$SECONDS
"$VENV/bin/python" -m pip install --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "${PINS[@]}"
echo "$BUILD" > "$STAMP"
echo "setup_llamacpp: built llama-cpp-python $(installed) in $((SECONDS - start)) s ($CMAKE_ARGS, $NO_AMX)"
"$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'
