# shellcheck shell=bash
# Sourced by scripts/checks/promtool-rules and scripts/checks/promql-parse.
# ensure_prometheus: make `promtool` and `prometheus` available, or fail with how to get them.
# Installs the Debian package `prometheus` when missing and running as root with apt-get;
# never skips.
ensure_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "prometheus/promtool missing: installing the Debian package prometheus (apt-get)"
    # wait for a concurrent apt/dpkg instead of failing on its lock
    if ! { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
             --no-install-recommends prometheus >/dev/null; }; then
      echo "FAIL: apt-get install prometheus failed" >&2
      return 1
    fi
    if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
      echo "FAIL: the prometheus package did not provide promtool and prometheus" >&2
      return 1
    fi
    return 0
  fi
  echo "FAIL: promtool and prometheus are required: install Prometheus (Debian/Ubuntu: sudo apt-get install prometheus; or a release from prometheus.io with both binaries on PATH)" >&2
  return 1
}
