#!/usr/bin/env bash
# Builds the project's container image without a Docker daemon, as an OCI image archive that
# `ctr -n k8s.io images import` (containerd) or `podman load` reads. The recipe is the
# Dockerfile's: its final stage's USER, EXPOSE, ENTRYPOINT, CMD and the path it copies the
# binary to are read from the Dockerfile itself; the base is the binary plus the shared
# libraries it links (ldd), the CA bundle and a passwd with the non-root user, from this
# Debian machine, as the distroless base holds them.
#
#   scripts/image.sh [--binary PATH] [--output FILE] [--name NAME:TAG]
#
# Without --binary it builds the release binary first. Prints the archive's path.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
binary="" output="target/image/mcp-session-operator-$version.oci.tar"
name="mcp-session-operator:$version"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    *) die "unknown option $1 (scripts/image.sh [--binary PATH] [--output FILE] [--name NAME:TAG])" ;;
  esac
done
if [ -z "$binary" ]; then
  log "cargo build --release (the image's binary)"
  cargo build --release --locked --bin mcp-session-operator >&2
  binary="target/release/mcp-session-operator"
fi
[ -x "$binary" ] || die "$binary is not an executable"

# The final stage of the Dockerfile: everything after its last FROM.
final_stage="$(awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' Dockerfile)"
instruction() { printf '%s' "$final_stage" | sed -n "s/^$1 //p" | tail -n 1; }
user="$(instruction USER)"
ports="$(instruction EXPOSE)"
entrypoint="$(instruction ENTRYPOINT)"
cmd="$(instruction CMD)"
installed="$(printf '%s' "$final_stage" | sed -n 's/^COPY --from=build [^ ]* //p' | tail -n 1)"
for field in user ports entrypoint cmd installed; do
  [ -n "${!field}" ] || die "the Dockerfile's final stage has no $field"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

# The binary and what it links, each library at the path the loader looks for it.
install -D -m 0755 "$binary" "$rootfs$installed"
ldd "$binary" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r library; do
  install -D -m 0755 "$(readlink -f "$library")" "$rootfs$library"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
uid="${user%%:*}" gid="${user##*:}"
install -d -m 0755 "$rootfs/etc" "$rootfs/home/nonroot"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' "$uid" "$gid" > "$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:%s:\n' "$gid" > "$rootfs/etc/group"
install -d -m 1777 "$rootfs/tmp"

exposed="$(for port in $ports; do printf '"%s/tcp":{},' "$port"; done)"
run_config="$(printf '{"User":"%s","ExposedPorts":{%s},"Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"}' \
  "$user" "${exposed%,}" "$entrypoint" "$cmd")"
OWNED_PATHS="home/nonroot" scripts/oci-archive.sh "$rootfs" "$run_config" "$name" "$output"
log "image $name: $(du -h "$output" | cut -f1) in $output"
echo "$output"
