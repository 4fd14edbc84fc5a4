#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages (apt, as root), the virtual environment .venv
# and hyq-tvm with its pinned dependencies. A second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist gcc gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user qemu-user-static binfmt-support debootstrap
              gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.hyq-tvm-installed
wanted=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$wanted" > "$stamp"
fi

# Emulated ARM boards (python -m hyq_tvm.device): aarch64 binaries through qemu-aarch64-static via
# binfmt_misc (needed by chroot into the arm64 rootfs), and the instruction-counting QEMU plugin
# (native/icount.c, built once into the cache). HYQ_TVM_BUILD_ROOTFS=1 also builds the arm64 rootfs
# now (3-5 min once); otherwise the first `device start` or slow test builds it.
if [ "$(id -u)" -eq 0 ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
  fi
  grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || update-binfmts --enable qemu-aarch64 || true
fi
.venv/bin/python -c 'from hyq_tvm.devices import build_plugin; build_plugin()' >/dev/null
if [ "${HYQ_TVM_BUILD_ROOTFS:-0}" = 1 ]; then
  .venv/bin/python -c 'from hyq_tvm.devices import build_rootfs; build_rootfs()'
fi
