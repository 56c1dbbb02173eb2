#!/bin/bash
# `make deps`: install the Debian packages of scripts/apt-packages.txt.
# Fast and quiet when everything is installed already (one dpkg-query); apt-get update runs
# only when something is missing and the package lists are older than a day (or absent).
set -euo pipefail
list="$(dirname "$0")/apt-packages.txt"
mapfile -t wanted < <(grep -v '^\s*\(#\|$\)' "$list")
declare -A installed=()
while read -r pkg status; do
    [[ "$status" == installed ]] && installed[${pkg%%:*}]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${wanted[@]}" 2>/dev/null || true)
missing=()
for pkg in "${wanted[@]}"; do
    [[ -n "${installed[$pkg]:-}" ]] || missing+=("$pkg")
done
if (( ${#missing[@]} == 0 )); then
    exit 0
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 -print -quit 2>/dev/null)" ]]; then
    apt-get update -qq
fi
# Debian's packages start their daemons at install time; the local cluster runs its own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; created_policy=1
fi
trap '[[ $created_policy == 1 ]] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}"
