#!/usr/bin/env bash
# Tools some tests use beyond the Python test extras. Best effort: without root, apt or npm the tests
# that need a tool skip with the install command in their reason, and everything else still runs.
#   libb64-0d           perf_analyzer (from the tritonclient wheel) links against it
#   prometheus          promtool checks/unit-tests the rules; the live dashboard test runs a real Prometheus
#   shellcheck          lints scripts/build-image.sh
#   checkov             scans the rendered Kubernetes manifests (own virtualenv: it pins old libraries)
#   @kubernetes-models/prometheus-operator (npm)  CRD schemas for the ServiceMonitor / PrometheusRule check
set -u
note() { echo "setup-system: $*" >&2; }

apt_need=()
for pkg in libb64-0d prometheus shellcheck; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt_need+=("$pkg")
done
if [ ${#apt_need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${apt_need[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${apt_need[@]}" >/dev/null 2>&1; } \
      || note "could not install ${apt_need[*]}; the tests that use them will skip"
    # the Debian package starts a Prometheus service; the tests run their own on a free port
    command -v systemctl >/dev/null 2>&1 && systemctl stop prometheus >/dev/null 2>&1
    pkill -x prometheus >/dev/null 2>&1 || true
  else
    note "not installing ${apt_need[*]} (needs root and apt-get); the tests that use them will skip"
  fi
fi

if [ ! -x /opt/checkov/bin/checkov ] && ! command -v checkov >/dev/null; then
  if [ -w /opt ] || [ "$(id -u)" -eq 0 ]; then
    python3 -m venv /opt/checkov && /opt/checkov/bin/pip install -q 'checkov>=3.2' >/dev/null 2>&1 \
      || note "could not install checkov; its tests will skip"
  fi
fi

if [ ! -d /opt/slimserve-crd/node_modules/@kubernetes-models/prometheus-operator ] && command -v npm >/dev/null; then
  if [ -w /opt ] || [ "$(id -u)" -eq 0 ]; then
    npm install --silent --prefix /opt/slimserve-crd @kubernetes-models/prometheus-operator@6.0.0 >/dev/null 2>&1 \
      || note "could not install the CRD schemas; the CRD check will skip"
  fi
fi
exit 0
