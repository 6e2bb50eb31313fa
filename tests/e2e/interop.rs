//! Interop: agents instrumented with the Python OpenTelemetry SDK (installed from PyPI by
//! the set-up below) export GenAI spans over OTLP gRPC and HTTP and GenAI metrics over
//! OTLP gRPC; the commander's API then shows the right workers, tokens, costs and states.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Stack, WAIT, eventually};

const PACKAGES: [&str; 3] = [
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-exporter-otlp-proto-http",
];

fn has_sdk(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args([
                "-c",
                "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http",
            ])
            .status()
            .is_ok_and(|s| s.success())
}

/// A Python with the OpenTelemetry SDK: `$FLEET_OTEL_PYTHON`, the repo's `.venv`, or a
/// venv made once under `target/otel-venv` with the packages from PyPI.
fn otel_python() -> &'static PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("FLEET_OTEL_PYTHON") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo_venv = root.join(".venv/bin/python");
        if has_sdk(&repo_venv) {
            return repo_venv;
        }
        let venv = root.join("target/otel-venv");
        let python = venv.join("bin/python");
        if !has_sdk(&python) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "python3 -m venv failed (is python3-venv installed?)");
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .args(PACKAGES)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "pip install of the OpenTelemetry SDK failed");
        }
        python
    })
}

async fn get(stack: &Stack, path: &str) -> Value {
    reqwest::get(stack.http(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The worker whose id is `service` or starts with `service@`.
fn find(workers: &[Value], service: &str) -> Option<Value> {
    workers
        .iter()
        .find(|w| {
            w["id"]
                .as_str()
                .is_some_and(|id| id == service || id.starts_with(&format!("{service}@")))
        })
        .cloned()
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_otel_sdk_agents_show_up_with_tokens_costs_and_states() {
    let python = tokio::task::spawn_blocking(|| otel_python().clone())
        .await
        .unwrap();
    let stack = Stack::start("[pools.research]\n").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/interop/otel_agents.py");
    let grpc = stack.commander.otlp_grpc().unwrap().to_string();
    let http = stack.commander.otlp_http().unwrap().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg(&grpc)
            .arg(&http)
            .output(),
    )
    .await
    .expect("the Python agents finish")
    .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut workers = Vec::new();
    eventually("the three Python agents", WAIT, async || {
        let v = get(&stack, "/v1/workers?pool=research").await;
        workers = v["workers"].as_array().unwrap().clone();
        let by = |id: &str| find(&workers, id);
        by("py-grpc-agent").is_some_and(|w| w["tasks_completed"] == 3)
            && by("py-http-agent").is_some_and(|w| w["tasks_failed"] == 1)
    })
    .await;
    // The Python SDK gives the process a service.instance.id: workers are name@instance.
    let by = |id: &str| find(&workers, id).unwrap();

    // Current attribute names, gRPC: gpt-4o at $2.50 / $10.
    let g = by("py-grpc-agent");
    assert_eq!(g["state"], "IDLE");
    assert_eq!(g["model"], "gpt-4o");
    assert_eq!(g["provider"], "openai");
    assert_eq!(g["version"], "2.3.1");
    assert_eq!(g["agent_name"], "researcher");
    assert_eq!(g["input_tokens"], 3_600);
    assert_eq!(g["output_tokens"], 900);
    assert!(
        close(&g["cost_usd"], 3.0 * (1_200.0 * 2.5 + 300.0 * 10.0) / 1e6),
        "{g}"
    );
    let detail = get(
        &stack,
        &format!("/v1/workers/{}", g["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(detail["tools"]["web_search"]["calls"], 3);
    assert_eq!(detail["recent_tasks"][0]["task_type"], "research");

    // Old names over HTTP (gen_ai.system, prompt/completion tokens); the last run failed.
    let h = by("py-http-agent");
    assert_eq!(h["state"], "ERROR");
    assert_eq!(h["provider"], "anthropic");
    assert_eq!(h["tasks_completed"], 1);
    assert_eq!(h["input_tokens"], 2_400);
    assert!(
        close(&h["cost_usd"], 2.0 * (1_200.0 * 3.0 + 300.0 * 15.0) / 1e6),
        "{h}"
    );
    assert!(h["error_rate_5m"].as_f64().unwrap() > 0.0);

    // GenAI metrics only (gen_ai.client.token.usage over OTLP/gRPC MetricsService).
    let mut m = Value::Null;
    eventually("metric tokens booked", WAIT, async || {
        let all = get(&stack, "/v1/workers").await;
        m = find(all["workers"].as_array().unwrap(), "py-metrics-agent").unwrap_or_default();
        m["input_tokens"] == 5_000
    })
    .await;
    assert_eq!(m["output_tokens"], 500);
    assert!(
        close(&m["cost_usd"], (5_000.0 * 0.15 + 500.0 * 0.60) / 1e6),
        "{m}"
    );

    // Baggage → attribution.
    let costs = get(&stack, "/v1/costs?by=team,task_type").await;
    let row = costs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["team"] == "research-team")
        .cloned()
        .unwrap_or_else(|| panic!("{costs}"));
    assert_eq!(row["group"]["task_type"], "research");
    assert_eq!(row["calls"], 5);
    let f = get(&stack, "/v1/fleet").await;
    assert_eq!(f["states"]["ERROR"], 1);
    assert_eq!(f["task_types"][0]["task_type"], "research");
}
