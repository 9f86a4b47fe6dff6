#!/usr/bin/env bash
# Installs what `make bench` needs besides Go, when it is missing: Node.js
# and npm from Debian (npm then installs the pinned PM2 into .cache/bench,
# never globally). The load generator is Go code in this directory, built
# by `go run`: nothing to install for it.
set -euo pipefail

need=()
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
((${#need[@]})) || exit 0

if [ "$(id -u)" != 0 ]; then
	echo "bench deps: missing ${need[*]}: run 'sudo apt-get install ${need[*]}'" >&2
	exit 1
fi
echo "bench deps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
