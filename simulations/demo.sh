#!/usr/bin/env bash
# Command one: set up a fresh Debian machine and run an example fleet.
#
# Installs nats-server (and prometheus-alertmanager, prometheus's promtool, chromium and
# chromium-driver, which the tests run) with apt when
# missing, builds the workspace in release mode,
# starts the commander (which starts nats-server itself when none is running), two example
# workers per pool and a producer that keeps submitting tasks. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The classifier's HTTPS client links the system OpenSSL.
if ! pkg-config --exists openssl 2>/dev/null; then
  echo "installing libssl-dev and pkg-config with apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config
fi
if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server with apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
fi
if ! command -v prometheus-alertmanager >/dev/null 2>&1 && ! command -v alertmanager >/dev/null 2>&1; then
  echo "installing prometheus-alertmanager with apt (the alert-delivery tests run a real one)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-alertmanager
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus with apt (the metrics test runs its promtool)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl with apt (the NATS TLS test makes its certificates with it)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
fi
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver with apt (the dashboard's browser test drives them)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust with https://rustup.rs (the toolchain is pinned in rust-toolchain.toml), then run this again" >&2
  exit 1
fi

cargo build --release -p fleet-commander -p fleet-sim -p fleet-worker --examples --bins

pids=()
cleanup() {
  echo; echo "stopping the example fleet"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap "exit 130" INT TERM

mkdir -p data/example
target/release/commander serve --config simulations/fleets/example.toml 2> data/example/commander.log &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fs http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs http://127.0.0.1:8080/readyz >/dev/null || { echo "the commander did not start; see data/example/commander.log" >&2; exit 1; }

for pool in code docs general code-standby; do
  for n in 1 2; do
    target/release/examples/worker --pool "$pool" --id "$pool-$n" --work-ms 400 2> "data/example/worker-$pool-$n.log" &
    pids+=($!)
  done
done

cat <<MSG

  fleet commander is running with an example fleet (pools: code, docs, general, code-standby; 2 workers each).
  A producer now submits a task every half second and prints each result.

    commander log   : data/example/commander.log
    the dashboard   : http://127.0.0.1:8080/  (local mode: no token needed on loopback)
    a task's record : curl -s http://127.0.0.1:8080/v1/tasks/<task_id>
    metrics         : curl -s http://127.0.0.1:8080/metrics
    the live fleet  : curl -s http://127.0.0.1:8080/v1/fleet
    workers / pools : curl -s http://127.0.0.1:8080/v1/workers ; curl -s http://127.0.0.1:8080/v1/pools
    costs by team   : curl -s 'http://127.0.0.1:8080/v1/costs?by=team,pool'
    policy, budgets : curl -s http://127.0.0.1:8080/v1/policy   (edit policies/*.policy.toml: live in ~0.2 s)
    deferred tasks  : curl -s 'http://127.0.0.1:8080/v1/tasks?state=deferred'
    OTLP in         : gRPC 127.0.0.1:4317, HTTP 127.0.0.1:4318 (any OpenTelemetry SDK)
    submit over HTTP: curl -s -XPOST http://127.0.0.1:8080/v1/tasks -d '{"schema":1,"description":"hello","capabilities":["code"]}'

  Ctrl-C stops everything.

MSG
target/release/examples/producer --count 0 --interval-ms 500
