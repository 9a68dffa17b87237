#!/usr/bin/env bash
# System packages some tests use. Best effort: without root or apt the tests that need them skip
# with a reason, and everything else still runs.
#   libb64-0d   perf_analyzer (from the tritonclient wheel) links against it
set -u
need=()
dpkg -s libb64-0d >/dev/null 2>&1 || need+=(libb64-0d)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not installing ${need[*]} (needs root and apt-get); the tests that use them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null; } \
  || echo "note: could not install ${need[*]}; the tests that use them will skip" >&2
exit 0
