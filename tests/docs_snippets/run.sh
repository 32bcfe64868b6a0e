#!/bin/sh
# Runs the snippets of docs/safetensors.md marked with a tag (numpy or torch), in order, in a
# scratch directory, with the release build of wgpu-attention on the PATH.
#   tests/docs_snippets/run.sh torch     # needs python3 with torch and safetensors
#   tests/docs_snippets/run.sh numpy     # needs python3 with numpy and safetensors
# `cargo test --test docs_snippets` runs the numpy ones too. WGPU_ATTENTION_BIN_DIR, if set, is
# the directory of an already built wgpu-attention, and nothing is built.
set -eu
tag=${1:-torch}
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${WGPU_ATTENTION_BIN_DIR:-}" ]; then
  cargo build --release --manifest-path "$root/Cargo.toml" --bin wgpu-attention
  WGPU_ATTENTION_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/release"
fi
PATH="$WGPU_ATTENTION_BIN_DIR:$PATH"
export PATH
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Splits the tagged blocks into numbered files: 001.py, 002.sh, ...
awk -v tag="$tag" -v dir="$work" '
  /^```/ && !inside { n = split(substr($0, 4), info, " "); lang = info[1]; keep = 0
                      for (i = 2; i <= n; i++) if (info[i] == tag) keep = 1
                      inside = 1
                      if (keep) { count++; file = sprintf("%s/%03d.%s", dir, count, lang == "python" ? "py" : "sh") }
                      next }
  /^```$/ && inside  { inside = 0; keep = 0; next }
  inside && keep     { print > file }
' "$root/docs/safetensors.md"
cd "$work"
found=0
for snippet in "$work"/*.py "$work"/*.sh; do
  [ -e "$snippet" ] || continue
  found=1
done
[ "$found" = 1 ] || { echo "no snippets tagged $tag" >&2; exit 1; }
for snippet in $(ls "$work" | sort); do
  echo "== $snippet"
  case "$snippet" in
    *.py) python3 "$snippet" ;;
    *.sh) sh "$snippet" ;;
  esac
done
echo "every $tag snippet ran"
