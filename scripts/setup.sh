#!/usr/bin/env bash
# Installs the Debian packages Aikido needs to build, test and benchmark. Safe to run again; skips what is there.
set -euo pipefail
packages=(
  build-essential cmake pkg-config git
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libcli11-dev nlohmann-json3-dev zlib1g-dev
  libtorch-dev libopenblas0-pthread dataset-fashion-mnist python3-torch
  openmpi-bin libopenmpi-dev libgloo-dev
  iproute2 procps python3
  libcurl4-openssl-dev etcd-server etcd-client openssl libssl-dev
  clang llvm libclang-rt-dev
  libcpp-httplib-dev libjs-chart.js chromium
  python3-dev pybind11-dev python3-pytest python3-numpy
  libssl-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
