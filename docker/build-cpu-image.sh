#!/usr/bin/env bash
# Builds the CPU variant of the Dockerfile with podman, on a machine with no Docker engine and no
# image registry (`make image-cpu`). Idempotent: each step is skipped when its result exists.
#
#   1. podman, buildah, debootstrap and runc from Debian's packages (apt needs root or sudo);
#   2. the base image, a local stand-in for python:3.11-slim: a Debian root filesystem made by
#      debootstrap from Debian's packages, with a venv whose `python`/`pip` come first on PATH,
#      imported as $CPU_BASE_IMAGE;
#   3. the CPU torch wheel, resolved as `pip install $TORCH_SPEC` resolves on this machine (here a
#      local find-links folder holds torch-2.13.0+cpu), copied to build/image/wheels/;
#   4. podman build of the same Dockerfile with BASE_IMAGE and TORCH_SPEC set (the only two
#      differences from the GPU image), the wheel folder and the host's CA bundle mounted for the
#      build only (pip goes through a TLS-intercepting proxy here; nothing of it enters the image).
#      --format docker: the OCI format has no HEALTHCHECK. --isolation chroot: no user namespaces or
#      cgroups needed for the RUN steps.
#
# Settings (environment): IMAGE (hf-finetune-serve:cpu), CPU_BASE_IMAGE, DEBIAN_SUITE (bookworm:
# Python 3.11, which the cp311 wheel needs), DEBIAN_MIRROR (apt's), TORCH_SPEC (torch==2.13.0), PYTHON (the
# host Python whose pip resolves TORCH_SPEC), CA_BUNDLE, APP_UID/APP_GID (1000).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-hf-finetune-serve:cpu}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
# The Debian mirror this machine's apt uses (deb822 .sources, then one-line .list files), so the base
# comes from the same package registry as everything else here; debootstrap's own default otherwise.
apt_mirror() {
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
        grep -hsE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E '/debian/?$' | head -n 1 || true
}
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(apt_mirror)}"
CPU_BASE_IMAGE="${CPU_BASE_IMAGE:-localhost/debian-python:${DEBIAN_SUITE}}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WORK="build/image"
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
start=$(date +%s)

# 1) Tools.
missing=()
for tool in podman buildah debootstrap runc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# 2) Base image: Debian + Python 3 in a venv at /opt/python (what python:3.11-slim gives: `python`
#    and `pip` that install into site-packages without fighting Debian's own packages).
if ! $SUDO podman image exists "$CPU_BASE_IMAGE"; then
    rootfs="$WORK/rootfs-$DEBIAN_SUITE"
    $SUDO rm -rf "$rootfs"
    mkdir -p "$WORK"
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        "$DEBIAN_SUITE" "$rootfs" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"}
    $SUDO chroot "$rootfs" python3 -m venv /opt/python
    $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar --numeric-owner -C "$rootfs" -c . | $SUDO podman import \
        --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python"]' \
        - "$CPU_BASE_IMAGE"
    $SUDO rm -rf "$rootfs"
fi

# 3) The torch wheel, as this machine's pip resolves TORCH_SPEC (no dependencies: the build
#    installs those from the registry).
wheels="$WORK/wheels"
if ! compgen -G "$wheels/torch-*.whl" >/dev/null; then
    mkdir -p "$wheels"
    "$PYTHON" -m pip download -q --no-deps -d "$wheels" "$TORCH_SPEC"
fi
mapfile -t found < <(cd "$wheels" && ls torch-*.whl)
if [ "${#found[@]}" -ne 1 ]; then
    echo "build-cpu-image: expected one torch wheel in $wheels, found: ${found[*]:-none}" >&2
    exit 1
fi
case "${found[0]}" in
    *+cpu*) ;;
    *) echo "build-cpu-image: ${found[0]} is not a CPU build (+cpu); set TORCH_SPEC" >&2; exit 1 ;;
esac

# 4) The image.
ca_mount=()
if [ -f "$CA_BUNDLE" ]; then
    ca_mount=(--volume "$(realpath "$CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro")
fi
$SUDO podman build \
    --isolation chroot \
    --format docker \
    --build-arg BASE_IMAGE="$CPU_BASE_IMAGE" \
    --build-arg TORCH_SPEC="/wheels/${found[0]}" \
    --build-arg APP_UID="${APP_UID:-1000}" \
    --build-arg APP_GID="${APP_GID:-1000}" \
    --volume "$(realpath "$wheels"):/wheels:ro" \
    "${ca_mount[@]}" \
    --tag "$IMAGE" \
    .

size=$($SUDO podman image inspect --format '{{.Size}}' "$IMAGE")
echo "build-cpu-image: $IMAGE, $((size / 1000000)) MB, built in $(($(date +%s) - start)) s"
