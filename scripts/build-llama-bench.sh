#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench`, `llama-batched-bench` and `llama-server` from the llama.cpp
# sources vendored in the llama-cpp-python sdist on PyPI (no other registry is reachable), for
# `python -m bench`'s decode section (the first two) and its serving section (the server).
# It is a yardstick, not a dependency of the app: nothing in the app or the tests needs it.
#
#   bash scripts/build-llama-bench.sh            # -> data/llama.cpp/bin/llama-bench, llama-batched-bench, llama-server
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 OUT=/elsewhere bash scripts/build-llama-bench.sh
#
# Needs cmake, a C++ compiler and pip; about 15 minutes on 2 cores. Built for this CPU (native). The
# server is built without its web UI (its assets come from Hugging Face or npm; the bench needs only
# the HTTP API).
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
out="${OUT:-data/llama.cpp}"
python="${PYTHON:-python3}"
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to build llama-bench" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading the llama-cpp-python $version sdist from PyPI"
"$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
echo "building llama-bench, llama-batched-bench and llama-server (llama.cpp from $src; log: $out/build.log)"
mkdir -p "$out/bin"
if ! { cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
         -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF \
         -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
       && cmake --build "$work/build" --target llama-bench llama-batched-bench llama-server -j "$(nproc)"; } > "$out/build.log" 2>&1; then
  tail -n 30 "$out/build.log" >&2
  echo "error: the build failed; the whole log is in $out/build.log" >&2
  exit 1
fi
cp "$work/build/bin/llama-bench" "$work/build/bin/llama-batched-bench" "$work/build/bin/llama-server" "$out/bin/"
echo "llama-cpp-python $version" > "$out/VERSION"
echo "built $out/bin/llama-bench"
