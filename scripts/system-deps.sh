#!/usr/bin/env bash
# Installs the system packages the stack, the tests and the benchmarks run.
# Each line below: a program (or file) that must be found, and the Debian package that has it.
# Missing programs are installed with apt-get when we are root; otherwise we say
# exactly what to install and fail, so `make` never goes on half set up.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
NEEDED=(
  # The interpreter .venv is made from (Makefile, PYTHON): Debian's own build,
  # with venv support and the headers the hot path is compiled against.
  "/usr/bin/python3.11 python3.11"
  "/usr/lib/python3.11/ensurepip/__init__.py python3.11-venv"
  "/usr/include/python3.11/Python.h python3.11-dev"
  "$PG_BIN/initdb postgresql-15"
  "$PG_BIN/pg_ctl postgresql-15"
  "$PG_BIN/postgres postgresql-15"
  "psql postgresql-client-15"
  "taskset util-linux"
  "gcc gcc"
  "openssl openssl"
  "wrk wrk"
  "nginx nginx-light"
  "haproxy haproxy"
  # dbproxy's pooled listeners are measured beside it (python -m bench pg --pooling)
  "pgbouncer pgbouncer"
  "docker-compose docker-compose"
  # the compose file run for real where there is no Docker engine (stack/containers.py):
  # podman with runc, DNS on its networks, and debootstrap for the stand-in images
  "podman podman"
  "runc runc"
  "/usr/lib/cni/dnsname golang-github-containernetworking-plugin-dnsname"
  "debootstrap debootstrap"
  # the local stack's Prometheus, and nginx's exporter for the classic profile
  "prometheus prometheus"
  "prometheus-nginx-exporter prometheus-nginx-exporter"
  # the status pages are checked in a real browser (tests/browser.py)
  "chromium chromium"
)

found() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    # nginx and haproxy live in /usr/sbin, which a non-root PATH may lack
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ;;
  esac
}

missing=()
for entry in "${NEEDED[@]}"; do
  read -r prog pkg <<<"$entry"
  if ! found "$prog"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# one package may have been listed for several programs
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "system packages missing: ${missing[*]}" >&2
  echo "install them as root:  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# Debian starts the packaged pgbouncer as a service on 127.0.0.1:6432, dbproxy's rw
# port; the benchmark runs its own, so the service is stopped and left disabled.
if printf '%s\n' "${missing[@]}" | grep -qx pgbouncer && [ -d /run/systemd/system ]; then
  systemctl disable --now pgbouncer >/dev/null 2>&1 || true
fi
