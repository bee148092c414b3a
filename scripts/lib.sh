# Shared by scripts/*.sh: installing what the project needs on a fresh Debian machine.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Cache outside the checkout: survives clean clones on the same machine.
CACHE_DIR="${MCP_SESSION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mcp-session-operator}"

# apt_install PACKAGE... : installs the Debian packages that are missing.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# python_venv REQUIREMENTS : prints the path of a cached venv's python with REQUIREMENTS installed.
python_venv() {
  local requirements="$1"
  local venv="$CACHE_DIR/venv"
  local stamp="$venv/.requirements"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating Python venv in $venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed (install python3-venv)"
  fi
  if ! cmp -s "$requirements" "$stamp"; then
    log "installing Python test peers from $requirements"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2 \
      || die "pip install -r $requirements failed"
    cp "$requirements" "$stamp"
  fi
  echo "$venv/bin/python"
}

# cached_archive NAME : reads the image's inputs on stdin; prints where the archive of image NAME
# built from them is kept (it exists if it was built before).
cached_archive() {
  echo "$CACHE_DIR/images/$1-$(sha256sum | cut -c1-16).oci.tar"
}

# write_archive ROOTFS ARCHIVE CONFIG NAME:TAG [CONFIG NAME:TAG]... : writes the images of ROOTFS
# (scripts/oci-archive.sh) to ARCHIVE whole, or not at all, and prints its path.
write_archive() {
  local rootfs="$1" archive="$2"
  shift 2
  mkdir -p "$(dirname "$archive")"
  scripts/oci-archive.sh "$rootfs" "$1" "$2" "$archive.partial" "${@:3}"
  mv "$archive.partial" "$archive"
  log "image: $(du -h "$archive" | cut -f1) in $archive"
  echo "$archive"
}
