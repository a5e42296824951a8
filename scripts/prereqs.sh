# Sourced by scripts/demo and scripts/test: checks what a fresh Debian machine lacks before
# anything is compiled or started, installs it when we may (root with apt-get), and otherwise
# prints the exact command and stops. `prereqs [extra packages...]`.

prereqs() {
  local need=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
    || need+=(postgresql-15 postgresql-client-15)
  [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
  # As root the servers run as `postgres` (initdb, postgres and pgbouncer refuse root).
  if [ "$(id -u)" = 0 ]; then id postgres >/dev/null 2>&1 || need+=(postgresql-common); fi
  need+=("$@")
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust (https://rustup.rs) and run this again" >&2
    return 1
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
  else
    echo "error: missing packages: ${need[*]}" >&2
    echo "install them, then run this again:" >&2
    echo "  sudo apt-get install -y ${need[*]}" >&2
    return 1
  fi
}
