#!/bin/sh
# An emulated aarch64 Linux device on this x86_64 machine, for trying `covspec device flash` for a Jetson
# without one. It measures the emulator, not a Jetson: qemu-user runs every aarch64 instruction in software.
#
#   scripts/aarch64_device.sh setup                 installs the tools, makes the device's root (once, cached)
#   scripts/aarch64_device.sh flash BUNDLE [ARGS]   covspec device flash BUNDLE into the device, for linux-aarch64
#   scripts/aarch64_device.sh run ARGS              the flashed launcher: covspec-device ARGS (e.g. run --edge ...)
#   scripts/aarch64_device.sh python ARGS           the device's python3 (aarch64, emulated)
#   scripts/aarch64_device.sh root                  prints the device's root folder
#
# The device: Debian bookworm's arm64 Python 3.11 and the C libraries it needs (apt-get download, dpkg -x
# into a cached folder, no root file system image), run by qemu-aarch64-static with -L ROOT: qemu looks every
# absolute path up under ROOT first, so the device has its own /usr/lib, and an aarch64 /proc/cpuinfo and
# /sys/devices/system/cpu/{possible,present} (= 0-1) that onnxruntime's cpuinfo reads instead of the host's
# x86 ones (it crashes on those). ROOT/usr/local/bin/python3 is a wrapper that runs the emulated python with
# argv[0] kept (qemu -0), so a venv made by it runs through the wrapper too: no binfmt_misc needed. The
# launcher's own shell is this machine's /bin/sh; every Python and native library it runs is aarch64.
# It shares this machine's network: an edge on 127.0.0.1 is reachable.
#
# Installs are cached in ${COVSPEC_CACHE:-~/.cache/covspec}/aarch64-device. Needs root and apt the first time
# (qemu-user-static, g++-aarch64-linux-gnu, file; dpkg --add-architecture arm64); where it cannot, it exits
# 77 saying why (tests skip on that).
# Environment: DEVICE_DIR (where `flash` puts the bundle and runtime; default ROOT/opt/covspec),
# COVSPEC (the covspec command flashing; default: covspec on PATH).
set -eu

CACHE=${COVSPEC_CACHE:-$HOME/.cache/covspec}/aarch64-device
ROOT=$CACHE/root
DEVICE_DIR=${DEVICE_DIR:-$ROOT/opt/covspec}
PACKAGES="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11-venv libc6 zlib1g libexpat1
libssl3 libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libgcc-s1
libstdc++6 libdb5.3 libnsl2 libtirpc3 libcrypt1 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0
libcom-err2 libkeyutils1 libgomp1"
ALL_PACKAGES="python3-pip-whl python3-setuptools-whl media-types"  # architecture-independent

say() { echo "aarch64 device: $*" >&2; }
skip() { say "skip: $*"; exit 77; }

tools() {
  missing=""
  command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$missing qemu-user-static"
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing="$missing g++-aarch64-linux-gnu"
  command -v file >/dev/null 2>&1 || missing="$missing file"
  dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64 || missing="$missing arm64-architecture"
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null 2>&1 || skip "needs$missing and there is no apt-get here (a Debian/Ubuntu machine)"
  [ "$(id -u)" = 0 ] || skip "needs$missing: run once as root (apt-get install), or install them yourself"
  say "installing$missing (apt, once)"
  dpkg --add-architecture arm64
  apt-get update -qq >&2 || skip "apt-get update failed (no network to the Debian archive?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu file >&2 ||
    skip "apt-get install qemu-user-static g++-aarch64-linux-gnu file failed"
}

root() {
  [ -f "$ROOT/.covspec-ready" ] && return 0
  command -v apt-get >/dev/null 2>&1 || skip "making the device's root needs apt-get download (a Debian machine)"
  say "making the device's root in $ROOT (apt-get download of arm64 Python 3.11 and its libraries, once)"
  rm -rf "$CACHE/debs" "$ROOT"
  mkdir -p "$CACHE/debs"
  arm64=""
  for p in $PACKAGES; do arm64="$arm64 $p:arm64"; done
  # shellcheck disable=SC2086
  (cd "$CACHE/debs" && apt-get download $arm64 $ALL_PACKAGES >&2 2>/dev/null) ||
    { [ "$(id -u)" = 0 ] && apt-get update -qq >&2 && (cd "$CACHE/debs" && apt-get download $arm64 $ALL_PACKAGES >&2); } ||
    skip "apt-get download of the arm64 packages failed (dpkg --add-architecture arm64 && apt-get update?)"
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
  mkdir -p "$ROOT/proc" "$ROOT/sys/devices/system/cpu" "$ROOT/usr/local/bin"
  for n in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' $n
  done > "$ROOT/proc/cpuinfo"
  for f in possible present online; do echo 0-1 > "$ROOT/sys/devices/system/cpu/$f"; done
  cat > "$ROOT/usr/local/bin/python3" <<EOF
#!/bin/sh
# the emulated device's python3 (aarch64, Python 3.11): argv[0] kept, so that a venv made by it runs through here
exec qemu-aarch64-static -L "$ROOT" -0 "\$0" "$ROOT/usr/bin/python3.11" "\$@"
EOF
  chmod 755 "$ROOT/usr/local/bin/python3"
  ln -sf python3 "$ROOT/usr/local/bin/python3.11"
  machine=$("$ROOT/usr/local/bin/python3" -c 'import platform; print(platform.machine())') ||
    skip "the emulated python does not start (qemu-aarch64-static -L $ROOT $ROOT/usr/bin/python3.11)"
  [ "$machine" = aarch64 ] || skip "the emulated python says machine $machine, not aarch64"
  touch "$ROOT/.covspec-ready"
  say "ready: $ROOT (python3: $ROOT/usr/local/bin/python3)"
}

device_env() {
  PATH="$ROOT/usr/local/bin:$PATH"
  export PATH
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) tools; root; echo "$ROOT" ;;
  root) echo "$ROOT" ;;
  python) root; device_env; exec python3 "$@" ;;
  flash)
    [ $# -ge 1 ] || { echo "usage: $0 flash BUNDLE [covspec device flash options]" >&2; exit 2; }
    tools; root
    bundle=$1; shift
    ${COVSPEC:-covspec} device flash --bundle "$bundle" --to "$DEVICE_DIR" --platform linux-aarch64 --python 3.11 "$@"
    ;;
  run)
    root; device_env
    [ -x "$DEVICE_DIR/bin/covspec-device" ] || { echo "nothing flashed in $DEVICE_DIR: $0 flash BUNDLE first" >&2; exit 2; }
    exec "$DEVICE_DIR/bin/covspec-device" "$@"
    ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
