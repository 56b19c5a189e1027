#!/usr/bin/env bash
# Installs what imagectl's builds and tests need on a Debian 12 (bookworm) host, as root.
# Idempotent: safe to run again. Used by run-main.sh and run-tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup-host.sh: run as root (it installs Debian packages)" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
# bookworm's e2fsprogs (1.47.0) cannot read a tar with `mkfs.ext4 -d`, and the machine's qemu-utils
# may already come from backports; take both (and a matching qemu-system) from backports, using the
# same mirror as the host's own apt sources.
if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 !~ /-/ {print $2; exit}' /etc/apt/sources.list)
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" > /etc/apt/sources.list.d/imagectl-backports.sources
fi

apt-get update -q
backports=()
if [ "$codename" = bookworm ]; then
  backports=(-t bookworm-backports)
fi
apt-get install -y -q "${backports[@]}" qemu-system-x86 qemu-utils e2fsprogs
apt-get install -y -q \
  mmdebstrap ovmf grub-efi-amd64-bin grub-pc-bin mtools dosfstools fdisk xorriso \
  libarchive13 gpg dpkg-dev apt-utils netcat-openbsd prometheus cloud-init python3-venv \
  prometheus-node-exporter curl time util-linux ca-certificates

# fakepve (the Proxmox VE API fake the integration tests run against), in a local venv.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade 'fakepve[crypto]' 'check-jsonschema'
echo "setup-host.sh: ready"
