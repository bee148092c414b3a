#!/usr/bin/env bash
# Writes a directory as a one-layer OCI image archive, with no Docker daemon: what
# `ctr -n k8s.io images import`, `podman load` and `skopeo` read. Used by scripts/image.sh (the
# project's image) and by the tests (the images of the test bed's pods).
#
#   scripts/oci-archive.sh ROOTFS CONFIG NAME:TAG OUTPUT [CONFIG NAME:TAG]...
#
# CONFIG is the image's run configuration as JSON (User, Entrypoint, Cmd, ExposedPorts, Env...).
# Each further CONFIG NAME:TAG pair is another image of the same layer (a version that runs it
# with other arguments, say): the archive holds the layer once. NAME is a reference as a pod
# spec writes it (`pause:local`, `example/server:1`), stored as containerd normalizes it.
# The layer is uncompressed and the same bytes for the same files: sorted, dated 1970, owned by
# root, but for what OWNED_PATHS (space-separated, relative to ROOTFS) names, owned by the
# first configuration's User.
set -euo pipefail
rootfs="$1" run_config="$2" name="$3" output="$4"
shift 4
images=("$run_config" "$name" "$@")
user="$(printf '%s' "$run_config" | sed -n 's/.*"User":"\([^"]*\)".*/\1/p')"

# The fully qualified reference, as containerd and the kubelet name an image: a name without a
# registry is Docker Hub's, and one without a path is in its `library`.
qualified() {
  case "$1" in
    */*) case "${1%%/*}" in *.*|*:*|localhost) echo "$1" ;; *) echo "docker.io/$1" ;; esac ;;
    *) echo "docker.io/library/$1" ;;
  esac
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
layout="$work/layout"
mkdir -p "$layout/blobs/sha256"

# blob FILE MEDIA-TYPE [ANNOTATIONS-JSON]: moves FILE into the layout; prints its descriptor.
blob() {
  local digest size
  digest="$(sha256sum "$1" | cut -d' ' -f1)"
  size="$(stat -c %s "$1")"
  mv "$1" "$layout/blobs/sha256/$digest"
  printf '{"mediaType":"%s","digest":"sha256:%s","size":%s%s}' "$2" "$digest" "$size" \
    "${3:+,\"annotations\":$3}"
}

owned=()
for path in ${OWNED_PATHS:-}; do owned+=(--exclude="./$path"); done
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$work/layer.tar" \
  "${owned[@]}" .
for path in ${OWNED_PATHS:-}; do
  tar --sort=name --mtime=@0 --numeric-owner --owner="${user%%:*}" --group="${user##*:}" \
    -C "$rootfs" -rf "$work/layer.tar" "./$path"
done
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
layer="$(blob "$work/layer.tar" application/vnd.oci.image.layer.v1.tar)"
manifests=""
for ((i = 0; i < ${#images[@]}; i += 2)); do
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "${images[i]}" "$diff_id" > "$work/config.json"
  config="$(blob "$work/config.json" application/vnd.oci.image.config.v1+json)"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
    "$config" "$layer" > "$work/manifest.json"
  image="${images[i + 1]}"
  names="$(printf '{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"%s"}' \
    "${image##*:}" "$(qualified "$image")")"
  manifests="$manifests${manifests:+,}$(blob "$work/manifest.json" application/vnd.oci.image.manifest.v1+json "$names")"
done
printf '{"schemaVersion":2,"manifests":[%s]}' "$manifests" > "$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"

mkdir -p "$(dirname "$output")"
tar --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -C "$layout" -cf "$output" \
  oci-layout index.json blobs
