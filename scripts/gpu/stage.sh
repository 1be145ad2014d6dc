#!/usr/bin/env bash
# Sends files larger than one device call's carry (64 MiB with the working tree) to the GPU machine in parts, over
# consecutive calls of one warm machine (it goes back after 30 s idle: keep the calls back to back).
#   here:               scripts/gpu/stage.sh split [--part-mib 57] FILE...
#                       -> .devstage/01, 02, … (git-ignored), each one part of a tar of FILEs plus the manifest
#   on the GPU machine: scripts/gpu/stage.sh receive [DIR]   (call k carries .devstage/NN)
#                       keeps each carried part in DIR (default /tmp/stage); once all have come, joins them, checks
#                       every file's SHA-256 against the manifest and unpacks the files into DIR/files
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  split)
    shift
    part_mib=57
    if [ "${1:-}" = --part-mib ]; then part_mib=$2; shift 2; fi
    [ $# -gt 0 ] || { echo "usage: scripts/gpu/stage.sh split [--part-mib N] FILE..." >&2; exit 2; }
    grep -qx '/.devstage/' .git/info/exclude 2>/dev/null || echo '/.devstage/' >> .git/info/exclude
    rm -rf .devstage && mkdir -p .devstage/tmp
    tar -cf .devstage/tmp/payload.tar --transform 's,.*/,,' "$@"
    (cd .devstage/tmp && split -b "${part_mib}M" -d -a 2 payload.tar part.)
    n=$(ls .devstage/tmp/part.* | wc -l)
    sha256sum "$@" | sed 's,  .*/,  ,' > .devstage/tmp/manifest
    echo "parts $n" >> .devstage/tmp/manifest
    i=0
    for p in .devstage/tmp/part.*; do
      i=$((i + 1)); d=$(printf '.devstage/%02d' "$i")
      mkdir -p "$d" && mv "$p" "$d/" && cp .devstage/tmp/manifest "$d/"
    done
    rm -rf .devstage/tmp
    echo "$n parts of at most $part_mib MiB: carry .devstage/01 … .devstage/$(printf %02d "$n") in consecutive calls"
    ;;
  receive)
    dir=${2:-/tmp/stage}
    mkdir -p "$dir"
    for d in .devstage/*/; do
      [ -f "$d/manifest" ] || continue
      cp "$d/manifest" "$dir/manifest"
      # A warm machine may keep the parts carried by earlier calls: copy each once.
      for p in "$d"/part.*; do [ -f "$dir/$(basename "$p")" ] || cp "$p" "$dir/"; done
    done
    [ -f "$dir/manifest" ] || { echo "stage: nothing carried (carry a .devstage/NN folder)" >&2; exit 1; }
    want=$(awk '$1 == "parts" { print $2 }' "$dir/manifest")
    have=$(ls "$dir"/part.* 2>/dev/null | wc -l)
    echo "stage: $have of $want parts in $dir"
    if [ "$have" -eq "$want" ] && [ ! -d "$dir/files" ]; then
      mkdir -p "$dir/files.tmp"
      cat "$dir"/part.* | tar -xf - -C "$dir/files.tmp"
      (cd "$dir/files.tmp" && grep -v '^parts ' ../manifest | sha256sum -c --quiet -) || {
        echo "stage: SHA-256 mismatch after joining the parts" >&2; exit 1; }
      rm -f "$dir"/part.* && mv "$dir/files.tmp" "$dir/files"
      echo "stage: all files in $dir/files, SHA-256 as sent:"; ls -la "$dir/files"
    fi
    ;;
  *) echo "usage: scripts/gpu/stage.sh split [--part-mib N] FILE... | receive [DIR]" >&2; exit 2 ;;
esac
