#!/usr/bin/env bash
# Installs everything gmi needs to build, test and run its demo on Debian 12.
# Idempotent: packages already present are left alone. Run as root (or via sudo).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  clang libclang-rt-14-dev
  libjpeg62-turbo-dev libpng-dev zlib1g-dev
  libeigen3-dev libhiredis-dev nlohmann-json3-dev libcli11-dev libssl-dev libicu-dev
  libtorch-dev libopenblas0-pthread
  libzmq3-dev cppzmq-dev prometheus-cpp-dev libcpp-httplib-dev libyaml-cpp-dev libboost-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  redis-server redis-tools
  python3 python3-numpy python3-pil python3-skimage python3-matplotlib python3-jsonschema
  python3-torch python3-regex
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The pre-trained style network (npm's nsfwjs, converted to TorchScript) and the composite
# default encoder, into $GMI_ENCODER_DIR or ~/.local/share/gmi/encoders. Without npm it says
# so and the built-in encoder stays the default.
"$(dirname "$0")/install-encoders.sh"
echo "install-deps: done"
