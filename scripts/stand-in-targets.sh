#!/bin/sh
# Writes an empty stand-in for every target Cargo.toml declares ([[bin]], [[bench]], [[test]],
# [[example]]: at its `path`, else where Cargo looks for it) and for the package's library
# (src/lib.rs), so that Cargo loads the manifest with nothing but Cargo.toml and Cargo.lock
# beside it: the Dockerfile's dependency layer builds from these, and a target added to the
# manifest needs no edit here. Prints each file it writes.
set -eu
manifest="${1:-Cargo.toml}"

awk '
  function value(line) { sub(/^[^=]*=[ \t]*"/, "", line); sub(/".*$/, "", line); return line }
  function flush() { if (kind != "" && name != "") print kind, name, (path == "" ? "-" : path); name = ""; path = "" }
  /^\[\[(bin|bench|test|example)\]\]/ { flush(); kind = $0; gsub(/[\[\]]/, "", kind); next }
  /^\[/ { flush(); kind = ""; next }
  kind != "" && /^name[ \t]*=/ { name = value($0) }
  kind != "" && /^path[ \t]*=/ { path = value($0) }
  END { flush() }
' "$manifest" | {
  echo "lib - src/lib.rs"
  while read -r kind name path; do
    if [ "$path" = "-" ]; then
      case "$kind" in
        bin) path="src/bin/$name.rs" ;;
        bench) path="benches/$name.rs" ;;
        test) path="tests/$name.rs" ;;
        example) path="examples/$name.rs" ;;
      esac
    fi
    echo "$kind $name $path"
  done
} | while read -r kind name path; do
  mkdir -p "$(dirname "$path")"
  case "$kind" in
    lib) : > "$path" ;;
    *) echo 'fn main() {}' > "$path" ;;
  esac
  echo "$path"
done
