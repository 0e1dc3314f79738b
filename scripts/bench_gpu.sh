#!/usr/bin/env bash
# The GPU check of the embed path, prepared to run in one call on a GPU machine:
#   - images/s of the embed path (batching + preprocessing from decoded uint8 pixels + forward
#     + reduction + copy back) against the bare TorchScript forward (fp16, inference mode,
#     input already on the device), at batch 256, in the same run (bench/bench_embed.cpp);
#   - CPU-fp32 against CUDA-fp16 rows of the same card (min cosine);
# for a CLIP ViT-B/32 of random weights (scripts/export_clip.py --random-init) and for the
# pre-trained MobileNetV2 style encoder (gmi-mnv2-style).
#
#   scripts/bench_gpu.sh --prepare   # on the Debian machine: unpacks into .gpu/ the Debian
#                                    # packages the encoders-only build needs, and the installed
#                                    # gmi-mnv2-style encoder (run carries .gpu/ over)
#   scripts/bench_gpu.sh [--batch N] [--seconds S] [--device cuda:0]
#                                    # on the GPU machine (its python3 has a CUDA PyTorch whose
#                                    # package holds LibTorch): builds with -DGMI_ENCODERS_ONLY=ON,
#                                    # runs the checks, prints a table, writes $OUT/bench-gpu.jsonl
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
gpu=$root/.gpu
batch=256
seconds=5
device=cuda
prepare=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) prepare=1; shift ;;
    --batch) batch=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench_gpu: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$prepare" = 1 ]; then
  # Header and library packages the encoders-only build links (Eigen is on the GPU image).
  pkgs=(libjpeg62-turbo-dev libjpeg62-turbo libpng-dev libpng16-16 nlohmann-json3-dev libcli11-dev
        libicu-dev libicu72 libssl-dev libssl3 zlib1g-dev)
  rm -rf "$gpu" && mkdir -p "$gpu/debs" "$gpu/deps" "$gpu/encoders"
  (cd "$gpu/debs" && apt-get download "${pkgs[@]}" >/dev/null)
  for deb in "$gpu"/debs/*.deb; do dpkg -x "$deb" "$gpu/deps"; done
  # What a build needs: headers, CMake/pkg-config files, shared libraries (run carries 64 MiB).
  rm -rf "$gpu/debs" "$gpu/deps/usr/share/doc" "$gpu/deps/usr/share/man" "$gpu/deps/usr/bin" "$gpu/deps/usr/sbin" \
    "$gpu/deps/usr/share/icu" "$gpu/deps/usr/lib/x86_64-linux-gnu/icu"
  find "$gpu/deps" \( -name '*.a' -o -name 'libicuio*' -o -name 'libicutest*' -o -name 'libicutu*' -o -name 'libicui18n*' \) -delete
  enc=${GMI_ENCODER_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/gmi/encoders}
  if [ -f "$enc/gmi-mnv2-style/card.json" ]; then
    cp -r "$enc/gmi-mnv2-style" "$gpu/encoders/"
  else
    echo "bench_gpu: no gmi-mnv2-style in $enc (scripts/install-encoders.sh); only CLIP will be measured" >&2
  fi
  echo "bench_gpu: prepared $(du -sh "$gpu" | cut -f1) in $gpu; on the GPU machine run scripts/bench_gpu.sh (carry .gpu)"
  exit 0
fi

out=${OUT:-$root/out}
mkdir -p "$out"
py=${PYTHON:-python3}
prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
abi=$("$py" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
echo "bench_gpu: $("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
deps=$gpu/deps
[ -d "$deps/usr/include" ] || { echo "bench_gpu: $deps missing: run scripts/bench_gpu.sh --prepare on the Debian machine and carry .gpu" >&2; exit 1; }
export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DGMI_ENCODERS_ONLY=ON \
  -DCMAKE_PREFIX_PATH="$prefix;$deps/usr" -DCMAKE_CXX_FLAGS="-D_GLIBCXX_USE_CXX11_ABI=$abi" \
  -DICU_ROOT="$deps/usr" -DJPEG_ROOT="$deps/usr" -DPNG_ROOT="$deps/usr" -DOPENSSL_ROOT_DIR="$deps/usr" \
  >"$out/bench-gpu-cmake.log" 2>&1 || { tail -30 "$out/bench-gpu-cmake.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" --target bench_embed >"$out/bench-gpu-build.log" 2>&1 ||
  { tail -30 "$out/bench-gpu-build.log"; exit 1; }

models=$gpu/models
rm -rf "$models" && mkdir -p "$models"
echo "bench_gpu: exporting a ViT-B/32 CLIP with random weights"
"$py" scripts/export_clip.py --random-init --arch ViT-B-32 --out "$models/clip-b32" >"$out/bench-gpu-export.log" 2>&1 ||
  { tail -20 "$out/bench-gpu-export.log"; exit 1; }
cards=("$models/clip-b32/image.card.json")
[ -f "$gpu/encoders/gmi-mnv2-style/card.json" ] && cards+=("$gpu/encoders/gmi-mnv2-style/card.json")

: >"$out/bench-gpu.jsonl"
for card in "${cards[@]}"; do
  build-gpu/bench/bench_embed --card "$card" --device "$device" --batch "$batch" --seconds "$seconds" --json \
    | tee -a "$out/bench-gpu.jsonl"
done
"$py" - "$out/bench-gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'encoder':<36} {'batch':>5} {'embed path/s':>13} {'bare fwd/s':>11} {'ratio':>6} {'min cos':>8}")
for r in rows:
    print(f"{r['encoder'][:36]:<36} {r['batch']:>5} {r['embed_path_images_per_s']:>13.0f} "
          f"{r['bare_forward_images_per_s']:>11.0f} {r['ratio']:>6.3f} {r.get('min_cosine_cpu_fp32_vs_device', float('nan')):>8.5f}")
PY
