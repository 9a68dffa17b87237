#!/usr/bin/env bash
# Build the slimserve container images from ./Dockerfile with docker, podman or buildah.
#
#   scripts/build-image.sh [cpu|gpu|all] [options]
#
# Options:
#   --image NAME          repository name (default: $IMAGE or "slimserve"); tags are NAME:VERSION-cpu / -gpu
#   --version V           version tag (default: the version in pyproject.toml)
#   --engine E            docker | podman | buildah (default: the first one found, in that order)
#   --push                push the tags after building
#   --debootstrap-base    build a Debian bookworm base (python3, venv, pip) with debootstrap, import it as
#                         localhost/slimserve-base:bookworm and use it as PYTHON_IMAGE; for machines that
#                         reach Debian's archive and PyPI but no container registry. CPU target only.
#   --smoke               after building the CPU image, start it (chroot into the image's root file system
#                         as uid 10001, so no container runtime is needed; root only), check
#                         /v2/health/live, /v2/health/ready and the image's HEALTHCHECK command, and stop it
#   -h, --help            this text
#
# Environment:
#   PYTHON_IMAGE, CUDA_IMAGE  base images (Dockerfile defaults: python:3.12-slim-bookworm and
#                             nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04)
#   ISOLATION                 podman/buildah --isolation (default: chroot, which works without user namespaces)
#   BUILD_ARGS                extra arguments passed to the build command, word-split
#
# Examples:
#   scripts/build-image.sh cpu                                   # docker or podman, default bases
#   scripts/build-image.sh all --image registry.example.com/ml/slimserve --push
#   scripts/build-image.sh cpu --engine podman --debootstrap-base --smoke   # no registry reachable
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGETS=cpu
IMAGE="${IMAGE:-slimserve}"
VERSION=""
ENGINE="${ENGINE:-}"
PUSH=0
DEBOOTSTRAP=0
SMOKE=0
ISOLATION="${ISOLATION:-chroot}"
BASE_TAG=localhost/slimserve-base:bookworm

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "build-image: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    cpu|gpu) TARGETS="$1" ;;
    all) TARGETS="cpu gpu" ;;
    --image) IMAGE="${2:?--image needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --engine) ENGINE="${2:?--engine needs a value}"; shift ;;
    --push) PUSH=1 ;;
    --debootstrap-base) DEBOOTSTRAP=1 ;;
    --smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

if [[ -z "$VERSION" ]]; then
  VERSION="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
  [[ -n "$VERSION" ]] || die "could not read the version from pyproject.toml; pass --version"
fi

if [[ -z "$ENGINE" ]]; then
  for e in docker podman buildah; do
    if command -v "$e" >/dev/null 2>&1; then ENGINE="$e"; break; fi
  done
  [[ -n "$ENGINE" ]] || die "no docker, podman or buildah found (apt-get install podman)"
fi
command -v "$ENGINE" >/dev/null 2>&1 || die "$ENGINE not found"

# shellcheck disable=SC2206  # BUILD_ARGS is meant to be word-split
EXTRA=(${BUILD_ARGS:-})
[[ -n "${PYTHON_IMAGE:-}" ]] && EXTRA+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
[[ -n "${CUDA_IMAGE:-}" ]] && EXTRA+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")

make_debootstrap_base() {
  [[ "$ENGINE" != docker ]] || die "--debootstrap-base needs podman or buildah"
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (apt-get install debootstrap)"
  [[ $EUID -eq 0 ]] || die "--debootstrap-base needs root"
  local rootfs
  rootfs="$(mktemp -d)"
  echo "build-image: debootstrap bookworm into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
  EXTRA+=(--build-arg "PYTHON_IMAGE=$BASE_TAG")
  # The host's CA bundle, so pip inside the build trusts what the host trusts.
  EXTRA+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
}

build() {
  local target="$1" tag="$IMAGE:$VERSION-$1"
  echo "build-image: $ENGINE building target $target as $tag"
  case "$ENGINE" in
    docker)
      DOCKER_BUILDKIT=1 docker build --target "$target" --build-arg "VERSION=$VERSION" "${EXTRA[@]}" \
        -t "$tag" "$ROOT" ;;
    podman)
      # --format docker keeps HEALTHCHECK (the OCI image format has no such field)
      podman build --isolation="$ISOLATION" --format docker --target "$target" --build-arg "VERSION=$VERSION" \
        "${EXTRA[@]}" -t "$tag" "$ROOT" ;;
    buildah)
      buildah build --isolation="$ISOLATION" --format docker --target "$target" --build-arg "VERSION=$VERSION" \
        "${EXTRA[@]}" -t "$tag" "$ROOT" ;;
    *) die "unsupported engine: $ENGINE" ;;
  esac
  if [[ $PUSH -eq 1 ]]; then
    "$ENGINE" push "$tag"
  fi
}

smoke() {
  local tag="$IMAGE:$VERSION-cpu" mnt root port pid ok=0 chroot_bin
  [[ "$ENGINE" == podman ]] || die "--smoke needs podman (it mounts the image)"
  [[ $EUID -eq 0 ]] || die "--smoke needs root (podman image mount, chroot)"
  chroot_bin="$(command -v chroot)" || die "chroot not found"
  mnt="$(podman image mount "$tag")"
  root="$(mktemp -d)"
  cp -a "$mnt/." "$root/"
  podman image unmount "$tag" >/dev/null
  mount -t proc proc "$root/proc"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  env -i PATH=/opt/slimserve/bin:/usr/bin:/bin HOME=/home/slimserve SLIMSERVE_HOST=127.0.0.1 \
    SLIMSERVE_PORT="$port" SLIMSERVE_DATA_DIR=/var/lib/slimserve \
    "$chroot_bin" --userspec=10001:10001 "$root" slimserve serve >"$root/tmp/smoke.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 60); do
    if python3 -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$port/v2/health/ready', timeout=1)" \
      2>/dev/null; then ok=1; break; fi
    sleep 1
  done
  local hc
  hc="$(podman image inspect "$tag" --format '{{json .Config.Healthcheck.Test}}' 2>/dev/null || true)"
  if [[ $ok -eq 1 && -n "$hc" && "$hc" != null ]]; then
    # run the image's own HEALTHCHECK command inside the image root
    mapfile -t hc_argv < <(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); print("\n".join(a[1:]))' "$hc")
    env -i PATH=/opt/slimserve/bin:/usr/bin:/bin SLIMSERVE_PORT="$port" \
      "$chroot_bin" --userspec=10001:10001 "$root" "${hc_argv[@]}" || ok=0
  elif [[ $ok -eq 1 ]]; then
    echo "build-image: smoke: image has no HEALTHCHECK" >&2; ok=0
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  umount "$root/proc"
  if [[ $ok -ne 1 ]]; then
    tail -n 40 "$root/tmp/smoke.log" >&2
    rm -rf "$root"
    die "smoke test failed for $tag"
  fi
  rm -rf "$root"
  echo "build-image: smoke test passed for $tag (live, ready, HEALTHCHECK)"
}

if [[ $DEBOOTSTRAP -eq 1 ]]; then
  [[ "$TARGETS" == cpu ]] || die "--debootstrap-base builds the CPU target only (the GPU target needs the CUDA base)"
  make_debootstrap_base
fi
for t in $TARGETS; do
  build "$t"
done
if [[ $SMOKE -eq 1 ]]; then
  [[ " $TARGETS " == *" cpu "* ]] || die "--smoke checks the CPU image; build it too"
  smoke
fi
