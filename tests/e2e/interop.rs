//! Interop: agents instrumented with the Python OpenTelemetry SDK (installed from PyPI by
//! the set-up below) export GenAI spans over OTLP gRPC and HTTP and GenAI metrics over
//! OTLP gRPC; the commander's API then shows the right workers, tokens, costs and states.
//! And the Python worker of docs/protocol.md, run as written, through a broker crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use fleet_testkit::fake_llm::{FakeLlm, Reply, USAGE_INPUT, USAGE_OUTPUT};

use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};

use crate::common::{Stack, WAIT, eventually, telemetry_applied};

/// The SDK, its OTLP exporters, the `openai` client and the official OpenAI
/// instrumentation. The instrumentation comes as Odigos' build of
/// `opentelemetry-instrumentation-openai-v2` (the same `openai_v2` module): the official
/// 2.4b0 imports `opentelemetry.util.genai.instruments`, which the only
/// `opentelemetry-util-genai` on PyPI (1.3b0) no longer has; and it calls wrapt's
/// `wrap_function_wrapper(module=…)`, which wrapt 2 renamed.
const PACKAGES: [&str; 8] = [
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-exporter-otlp-proto-http",
    "openai",
    "httpx",
    "odigos-opentelemetry-instrumentation-openai-v2",
    "wrapt<2",
    "nats-py",
];

fn has_sdk(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args([
                "-c",
                "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http, openai, opentelemetry.instrumentation.openai_v2, nats",
            ])
            // A Python without them is an answer, not an error: no traceback in the log.
            .stderr(std::process::Stdio::null())
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
        let v = stack.get_json("/v1/workers?pool=research").await;
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
    let detail = stack
        .get_json(&format!("/v1/workers/{}", g["id"].as_str().unwrap()))
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
        let all = stack.get_json("/v1/workers").await;
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
    let costs = stack.get_json("/v1/costs?by=team,task_type").await;
    let row = costs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["team"] == "research-team")
        .cloned()
        .unwrap_or_else(|| panic!("{costs}"));
    assert_eq!(row["group"]["task_type"], "research");
    assert_eq!(row["calls"], 5);
    let f = stack.get_json("/v1/fleet").await;
    assert_eq!(f["states"]["ERROR"], 1);
    assert_eq!(f["task_types"][0]["task_type"], "research");
}

/// One agent is one worker: the real `openai` client, instrumented by the official OpenAI
/// instrumentation, makes `chat` spans that carry no agent id; only the agent's own
/// `invoke_agent` span names it. Over gRPC and HTTP, each agent is one worker with every
/// token and its cost, its runs completed, and no `service@instance` ghost beside it (nor a
/// second count of the same tokens from the instrumentation's metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_instrumented_with_openai_v2_is_one_worker_over_grpc_and_http() {
    const RUNS: u64 = 3;
    let python = tokio::task::spawn_blocking(|| otel_python().clone())
        .await
        .unwrap();
    let llm = FakeLlm::start().unwrap();
    llm.otherwise(Reply::Text("the answer".into()));
    let stack = Stack::start("[pools.research]\n").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/interop/openai_agent.py");
    let grpc = stack.commander.otlp_grpc().unwrap().to_string();
    let http = stack.commander.otlp_http().unwrap().to_string();
    for (endpoint, protocol, agent) in [
        (&grpc, "grpc", "support-grpc"),
        (&http, "http", "support-http"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(&python)
                .arg(&script)
                .arg(endpoint)
                .arg(protocol)
                .arg(format!("{}/v1", llm.url()))
                .arg(agent)
                .arg(RUNS.to_string())
                .output(),
        )
        .await
        .expect("the agent finishes")
        .unwrap();
        assert!(
            out.status.success(),
            "python failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(llm.requests() as u64, 2 * 2 * RUNS, "two calls a run");
    let calls = 2 * RUNS;
    let cost = calls as f64 * (USAGE_INPUT as f64 * 0.15 + USAGE_OUTPUT as f64 * 0.60) / 1e6;
    for agent in ["support-grpc", "support-http"] {
        let mut w = Value::Null;
        eventually(&format!("{agent}'s runs complete"), WAIT, async || {
            w = stack.get_json(&format!("/v1/workers/{agent}")).await;
            w["tasks_completed"] == RUNS
        })
        .await;
        assert_eq!(w["input_tokens"], calls * USAGE_INPUT, "{w}");
        assert_eq!(w["output_tokens"], calls * USAGE_OUTPUT, "{w}");
        assert!(close(&w["cost_usd"], cost), "{w}");
        assert_eq!(w["model"], "gpt-4o-mini");
        assert_eq!(w["agent_name"], "support-bot");
        assert_eq!(w["running"], 0);
    }
    // Every export the agents made (their metrics too) is applied; then look for ghosts.
    let barrier = telemetry_applied(&stack).await;
    let all = stack.get_json("/v1/workers").await;
    let ids: Vec<&str> = all["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["id"].as_str())
        .filter(|id| *id != barrier)
        .collect();
    assert!(
        !ids.iter().any(|id| id.starts_with("openai-")),
        "no service@instance ghost: {ids:?}"
    );
    for agent in ["support-grpc", "support-http"] {
        let w = stack.get_json(&format!("/v1/workers/{agent}")).await;
        assert_eq!(w["state"], "IDLE", "{w}");
        assert_eq!(
            w["input_tokens"],
            calls * USAGE_INPUT,
            "metrics not counted again: {w}"
        );
    }
    let costs = stack.get_json("/v1/costs?by=model").await;
    assert!(close(&costs["total_usd"], 2.0 * cost), "{costs}");
}

/// The worker of docs/protocol.md section 9, as written; the line where "your agent runs"
/// also prints the task, so the test can count runs.
fn protocol_md_python_worker() -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"))
            .unwrap();
    let section = &doc[doc.find("## 9. A worker in Python").expect("section 9")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let code = &section[start..];
    let code = &code[..code.find("\n```").expect("the block ends")];
    assert!(code.contains("# your agent runs here"));
    code.replace(
        "# your agent runs here",
        "; print('RUN', task_id, attempt, flush=True)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_worker_of_protocol_md_runs_each_task_once_through_a_broker_crash() {
    let python = tokio::task::spawn_blocking(|| otel_python().clone())
        .await
        .unwrap();
    let mut stack = Stack::start("[pools.docs]\n").await;
    let script = stack.dir.path().join("worker.py");
    std::fs::write(&script, protocol_md_python_worker()).unwrap();
    let mut worker = tokio::process::Command::new(&python)
        .arg(&script)
        .env("FLEET_NATS_URL", stack.nats.url())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = worker.stdout.take().unwrap();
    let runs = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut runs: HashMap<String, u32> = HashMap::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("RUN ") {
                *runs.entry(rest.to_string()).or_default() += 1;
            }
        }
        runs
    });

    const N: usize = 300;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..N {
        tick.tick().await;
        if i == N / 2 {
            stack.nats.kill9();
            // The outage itself: the broker stays down this long.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stack.nats.restart().expect("nats-server restarts");
        }
        let mut task = Task::new(format!("python {i}"));
        task.id = Some(format!("py-{i}"));
        task.pool = Some("docs".into());
        producer
            .submit(&task, SubmitOptions::default())
            .await
            .unwrap_or_else(|e| panic!("py-{i} not accepted: {e}"));
    }
    for i in 0..N {
        let r = producer
            .await_result(&format!("py-{i}"), WAIT)
            .await
            .unwrap_or_else(|e| panic!("no result for py-{i}: {e}"));
        assert_eq!(r.status, ResultStatus::Ok, "{:?}", r.error);
    }
    worker.kill().await.unwrap();
    let runs = runs.await.unwrap();
    assert_eq!(runs.len(), N, "every task ran");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    eventually("the commander is ready", WAIT, async || {
        reqwest::get(stack.http("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// The worker of docs/protocol.md section 9, as written, obeys control commands (section
/// 10): pause keeps work queued, resume runs it, status answers, and an unknown command is
/// refused with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_of_protocol_md_obeys_pause_and_resume() {
    let python = tokio::task::spawn_blocking(|| otel_python().clone())
        .await
        .unwrap();
    let stack = Stack::start("[pools.docs]\n").await;
    let script = stack.dir.path().join("worker.py");
    std::fs::write(&script, protocol_md_python_worker()).unwrap();
    let mut worker = tokio::process::Command::new(&python)
        .arg(&script)
        .env("FLEET_NATS_URL", stack.nats.url())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = stack.client.clone();
    let ask = async |body: serde_json::Value| -> Option<serde_json::Value> {
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("fleet.control.py-1", body.to_string().into()),
        )
        .await
        .ok()?
        .ok()?;
        serde_json::from_slice(&reply.payload).ok()
    };
    eventually(
        "the Python worker answers on its control subject",
        WAIT,
        async || {
            ask(serde_json::json!({"schema": 1, "command": "status"}))
                .await
                .is_some_and(|r| r["ok"] == true && r["mode"] == "running")
        },
    )
    .await;

    let r = ask(serde_json::json!({"schema": 1, "command": "pause"}))
        .await
        .unwrap();
    assert_eq!(
        (&r["ok"], &r["mode"], &r["worker_id"]),
        (&true.into(), &"paused".into(), &"py-1".into()),
        "{r}"
    );
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut task = Task::new("held while paused");
    task.id = Some("py-paused".into());
    task.pool = Some("docs".into());
    producer
        .submit(&task, SubmitOptions::default())
        .await
        .unwrap();
    assert!(
        producer
            .await_result("py-paused", Duration::from_millis(1500))
            .await
            .is_err(),
        "a paused worker runs nothing"
    );
    let r = ask(serde_json::json!({"schema": 1, "command": "throttle", "tasks_per_s": 1.0}))
        .await
        .unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "unknown_command");
    assert_eq!(r["mode"], "paused", "nothing changed");

    let r = ask(serde_json::json!({"schema": 1, "command": "resume"}))
        .await
        .unwrap();
    assert_eq!(r["mode"], "running", "{r}");
    let done = producer.await_result("py-paused", WAIT).await.unwrap();
    assert_eq!(done.status, ResultStatus::Ok, "{:?}", done.error);
    worker.kill().await.unwrap();
}
