#!/usr/bin/env bash
# Installs the distribution packages that some tests drive for real (HAProxy, Chromium, ...) when
# their command is missing. `make test` runs it first; a test whose program could not be installed
# skips with a reason, so a machine without root or without the package index still runs the rest.
set -u
cd "$(dirname "$0")/.."
missing=()
while read -r command package; do
  [[ -z "${command:-}" || "$command" == \#* ]] && continue
  command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done < scripts/system-packages.txt
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system_deps: not root, not installing ${missing[*]}; the tests that need them will skip" >&2
  exit 0
fi
echo "system_deps: installing ${missing[*]}"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/system_deps.log 2>&1; then
  echo "system_deps: could not install ${missing[*]} (see /tmp/system_deps.log); the tests that need them will skip" >&2
fi
exit 0
