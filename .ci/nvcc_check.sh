#!/usr/bin/env bash
# Compile every CUDA source under csrc/ for the GPUs we ship (sm_80, sm_90)
# with warnings as errors.
#
# Why: setup.py builds the CUDA kernels only when torch is a CUDA build, so on
# a CPU-only box (CI, most laptops) nothing else ever compiles them; a broken
# or warning-laden .cu would first show up at a user's `pip install`.  nvcc
# needs no GPU, so the kernels are compiled here on their own (they include no
# torch headers by design).
#
# Also, when torch is importable, each csrc/*/*_cuda.cpp binding is
# syntax-checked with the host compiler against torch's headers: a CPU wheel
# ships the ATen/c10 CUDA headers, and nothing else checks these files there.
#
# Usage: bash .ci/nvcc_check.sh          (from anywhere; exit 0 = all clean)
# Env:   NVCC, PYTHON, CXX override the tools.  Exits 0 with a message only
#        when nvcc is not installed at all.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    nvcc="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$nvcc" ]]; then
  echo "nvcc_check: SKIPPED: nvcc is not installed (not on PATH, not in \$CUDA_HOME/bin or /usr/local/cuda/bin)"
  exit 0
fi
# nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), so ask it where
# the toolkit lives instead of guessing from its path.
cuda_top="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1 || true)"
cuda_include="${cuda_top:-$(dirname "$nvcc")/..}/include"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The flags of the real build (setup.py) plus warnings-as-errors for nvcc's
# front end and for the host compiler pass over the generated host code.
nvcc_flags=(
  -std=c++17 -O3 --use_fast_math -lineinfo
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Werror
  -I csrc
)

# Each file is one background job (its log and status go to $tmp), so the
# nvcc and g++ runs overlap; results are printed in a fixed order afterwards.
jobs_run=()
max_jobs="$(nproc 2>/dev/null || echo 2)"
run_job() {  # run_job NAME DESCRIPTION CMD...
  local name="$1" desc="$2"
  shift 2
  while [[ $(jobs -rp | wc -l) -ge $max_jobs ]]; do wait -n || true; done
  (
    start=$SECONDS
    if "$@" >"$tmp/$name.log" 2>&1; then
      echo "ok    $desc; $((SECONDS - start)) s" >"$tmp/$name.status"
    else
      echo "FAIL  $desc" >"$tmp/$name.status"
    fi
  ) &
  jobs_run+=("$name")
}

echo "nvcc_check: $("$nvcc" --version | tail -n 1)"
mapfile -t cu_files < <(find csrc -name '*.cu' -type f | LC_ALL=C sort)
if [[ ${#cu_files[@]} -eq 0 ]]; then
  echo "nvcc_check: no .cu files under csrc/"
fi
i=0
for src in "${cu_files[@]}"; do
  i=$((i + 1))
  run_job "cu_$i" "$src (nvcc, sm_80 + sm_90)" "$nvcc" "${nvcc_flags[@]}" -c "$src" -o "$tmp/cu_$i.o"
done

# Bindings: torch's include dirs come from the Python that has torch.
python="${PYTHON:-python3}"
cxx="${CXX:-g++}"
mapfile -t bindings < <(find csrc -name '*_cuda.cpp' -type f | LC_ALL=C sort)
if [[ ${#bindings[@]} -gt 0 ]]; then
  list_includes='from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))'
  if torch_inc="$("$python" -c "$list_includes" 2>/dev/null)" && command -v "$cxx" >/dev/null 2>&1; then
    inc_flags=()
    while IFS= read -r d; do inc_flags+=(-isystem "$d"); done <<<"$torch_inc"
    i=0
    for src in "${bindings[@]}"; do
      i=$((i + 1))
      # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU wheel lacks the generated
      # c10/cuda/impl/cuda_cmake_macros.h, which only matters for Windows
      # DLL exports.
      run_job "bind_$i" "$src (host syntax check against torch headers)" \
        "$cxx" -fsyntax-only -std=c++17 -Wall -Wextra -Werror "${inc_flags[@]}" -isystem "$cuda_include" \
        -I csrc -DFRONTIERS_FAST_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "$src"
    done
  else
    echo "nvcc_check: skipped the binding syntax check: torch is not importable by $python or $cxx is missing"
  fi
fi

wait
failed=0
for name in "${jobs_run[@]}"; do
  status="$(cat "$tmp/$name.status" 2>/dev/null || echo "FAIL  $name (no status)")"
  echo "nvcc_check: $status"
  if [[ "$status" != ok* ]]; then
    sed 's/^/    /' "$tmp/$name.log"
    failed=$((failed + 1))
  fi
done

if [[ $failed -gt 0 ]]; then
  echo "nvcc_check: $failed file(s) failed"
  exit 1
fi
echo "nvcc_check: all clean"
