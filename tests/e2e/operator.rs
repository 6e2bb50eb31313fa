//! The operator's surface on the real binary: roles on a live API, the control plane over
//! its WebSocket and `commander ctl` reaching real SDK workers, `/metrics` checked by the
//! real `promtool`, and the shipped Grafana board checked against what `/metrics` has.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_worker::{Producer, Subjects, SubmitOptions, Task, TaskOutput, Worker, WorkerConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::common::{Stack, TWO_POOLS, WAIT, eventually, task_record};

pub const TOKENS: &str = r#"
[[auth.tokens]]
name = "ops"
role = "operator"
token_env = "FLEET_OPS_TOKEN"

[[auth.tokens]]
name = "watcher"
role = "viewer"
token_env = "FLEET_VIEW_TOKEN"
"#;

pub const ENV: &[(&str, &str)] = &[
    ("FLEET_OPS_TOKEN", "ops-token"),
    ("FLEET_VIEW_TOKEN", "view-token"),
];

pub fn promtool() -> String {
    std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into())
}

/// A worker whose handler runs for `work`, counting the tasks it started.
pub async fn slow_worker(
    client: &async_nats::Client,
    pool: &str,
    id: &str,
    work: Duration,
) -> (fleet_worker::WorkerHandle, Arc<Mutex<Vec<String>>>) {
    let started = Arc::new(Mutex::new(Vec::new()));
    let seen = started.clone();
    let mut cfg = WorkerConfig::new(pool, id);
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg.max_in_flight = 1;
    let w = Worker::start(client.clone(), cfg, move |ctx| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(ctx.task_id.clone());
            // A cancel aborts this future (the SDK answers `cancelled`).
            tokio::time::sleep(work).await;
            Ok(TaskOutput {
                output: serde_json::json!({ "done": ctx.task_id }),
                usage: None,
            })
        }
    })
    .await
    .unwrap();
    (w, started)
}

/// Runs `commander ctl --api <api> <args>` (with `FLEET_TOKEN` set to `token`, if any)
/// off the async threads, as an operator's shell would.
async fn ctl(api: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_commander"));
    cmd.args(["ctl", "--api", api]).args(args);
    if let Some(t) = token {
        cmd.env("FLEET_TOKEN", t);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub async fn submit(client: &async_nats::Client, id: &str, pool: &str) {
    let producer = Producer::new(client.clone(), Subjects::default());
    let mut t = Task::new("operator test task");
    t.id = Some(id.into());
    t.pool = Some(pool.into());
    producer.submit(&t, SubmitOptions::default()).await.unwrap();
}

async fn ws_connect(
    stack: &Stack,
    token: Option<&str>,
    origin: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    u16,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = stack.http("/v1/control").replace("http://", "ws://");
    let mut req = url.into_client_request().unwrap();
    let mut protocols = "fleet.control.v1".to_string();
    if let Some(t) = token {
        protocols.push_str(&format!(", bearer.{t}"));
    }
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket: {e}"),
    }
}

async fn command<S>(ws: &mut S, cmd: Value) -> Value
where
    S: futures::Sink<
            tokio_tungstenite::tungstenite::Message,
            Error = tokio_tungstenite::tungstenite::Error,
        > + futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        cmd.to_string(),
    ))
    .await
    .unwrap();
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an ack in time")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// An operator pauses a worker over the control socket: the worker is told at once, its
/// heartbeat says paused, and a task for its pool waits; a resume lets it run. The
/// socket checks the token, the role and the page's origin; every command is audited
/// with who sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_over_the_control_socket_stops_the_worker_pulling_until_resumed() {
    let toml = format!("{TWO_POOLS}\n{TOKENS}");
    let stack = Stack::start_with_env(&toml, ENV)
        .await
        .with_token("view-token");
    let (worker, started) =
        slow_worker(&stack.client, "alpha", "a1", Duration::from_millis(10)).await;
    eventually("the worker is known", WAIT, async || {
        reqwest::Client::new()
            .get(stack.http("/v1/workers/a1"))
            .bearer_auth("view-token")
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;

    // The handshake: no token 401, a viewer 403, another site's page 403.
    assert_eq!(ws_connect(&stack, None, None).await.err(), Some(401));
    assert_eq!(
        ws_connect(&stack, Some("view-token"), None).await.err(),
        Some(403)
    );
    assert_eq!(
        ws_connect(&stack, Some("ops-token"), Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    let own_origin = stack.commander.http().to_string();
    let mut ws = ws_connect(&stack, Some("ops-token"), Some(&own_origin))
        .await
        .unwrap();

    let ack = command(
        &mut ws,
        json!({"id": "p1", "command": "pause", "worker": "a1", "reason": "maintenance"}),
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["id"], "p1");
    assert_eq!(ack["state"]["workers"]["a1"]["mode"], "paused", "{ack}");
    eventually("the worker's heartbeat says paused", WAIT, async || {
        stack.get_json("/v1/workers/a1").await["paused"] == true
    })
    .await;
    submit(&stack.client, "while-paused", "alpha").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        started.lock().unwrap().is_empty(),
        "a paused worker pulls nothing"
    );

    let ack = command(&mut ws, json!({"command": "resume", "worker": "a1"})).await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["ended"].as_array().unwrap().len(), 1, "{ack}");
    eventually(
        "the task runs once the worker is resumed",
        WAIT,
        async || stack.get_json("/v1/tasks/while-paused").await["state"] == "completed",
    )
    .await;
    // A refused command acks ok: false with why, over the same socket.
    let ack = command(&mut ws, json!({"command": "pause", "worker": "nobody"})).await;
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["error"]["code"], "not_found");

    let audit = stack.get_json("/v1/control/audit").await;
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{audit}");
    let pause = &records[2];
    assert_eq!(pause["who"], "ops");
    assert_eq!(pause["via"], "websocket");
    assert_eq!(pause["request"]["reason"], "maintenance");
    assert!(
        stack
            .metric("fleet_control_requests_total{command=\"pause\",outcome=\"ok\"}")
            .await
            >= 1.0
    );
    worker.shutdown().await;
}

/// `commander ctl` from a shell: cancel a running task (its result is `cancelled`), and
/// a viewer's token is refused with the API's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commander_ctl_cancels_a_running_task() {
    let toml = format!("{TWO_POOLS}\n{TOKENS}");
    let stack = Stack::start_with_env(&toml, ENV)
        .await
        .with_token("view-token");
    let (worker, started) = slow_worker(&stack.client, "alpha", "a1", WAIT).await;
    submit(&stack.client, "long-one", "alpha").await;
    eventually("the worker runs the task", WAIT, async || {
        stack.get_json("/v1/workers/a1").await["current_task"] == "long-one"
    })
    .await;
    assert_eq!(started.lock().unwrap().as_slice(), ["long-one"]);
    let api = stack.commander.http().to_string();
    let cancel = ["--identity", "carol", "cancel", "--task", "long-one"];
    let refused = ctl(&api, Some("view-token"), &cancel).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let done = ctl(&api, Some("ops-token"), &cancel).await;
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let ack: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["worker"], "a1");
    eventually("the task ends cancelled", WAIT, async || {
        stack.get_json("/v1/tasks/long-one").await["outcome"]["status"] == "cancelled"
    })
    .await;
    let audit = stack.get_json("/v1/control/audit").await;
    assert_eq!(audit["records"][0]["who"], "ops (carol)", "{audit}");
    worker.shutdown().await;
}

/// A task that waits in its pool's queue (the pool's one worker busy) is cancelled: it
/// never runs, its producer reads `cancelled` at once, its record ends with that outcome
/// and no charge, its message leaves the work stream, and the worker takes the next task
/// when it is free. A task a worker has been handed but not yet reported running is
/// refused with 409 and left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cancels_a_task_that_waits_in_its_pool_s_queue() {
    let stack = Stack::start(TWO_POOLS).await;
    let (worker, started) = slow_worker(&stack.client, "alpha", "a1", Duration::from_secs(3)).await;
    submit(&stack.client, "busy-1", "alpha").await;
    eventually("the worker runs the first task", WAIT, async || {
        stack.get_json("/v1/workers/a1").await["current_task"] == "busy-1"
    })
    .await;
    submit(&stack.client, "queued-1", "alpha").await;
    submit(&stack.client, "queued-2", "alpha").await;
    for id in ["queued-1", "queued-2"] {
        eventually("the task waits in alpha's queue", WAIT, async || {
            let r = stack.get_json(&format!("/v1/tasks/{id}")).await;
            r["state"] == "dispatched" && r["work_sequence"].is_u64()
        })
        .await;
    }
    let cancel = async |id: &str| {
        let r = stack
            .post("/v1/control")
            .json(&json!({"command": "cancel", "task_id": id, "reason": "sent by mistake"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (status, ack) = cancel("queued-1").await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["state"]["was"], "queued", "{ack}");
    assert_eq!(ack["state"]["pool"], "alpha", "{ack}");
    assert_eq!(ack["state"]["result"], "cancelled", "{ack}");
    assert!(ack["state"].get("note").is_none(), "{ack}");

    // The producer's answer is there at once, over HTTP as over NATS.
    let r = stack.get("/v1/tasks/queued-1/result").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let result: Value = r.json().await.unwrap();
    assert_eq!(result["status"], "cancelled", "{result}");
    assert_eq!(result["error"]["code"], "cancelled", "{result}");
    assert_eq!(result["attempt"], 1, "{result}");
    assert!(
        result["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sent by mistake")),
        "{result}"
    );
    eventually("the record ends cancelled", WAIT, async || {
        let r = stack.get_json("/v1/tasks/queued-1").await;
        r["state"] == "failed" && r["outcome"]["status"] == "cancelled"
    })
    .await;
    let (status, again) = cancel("queued-1").await;
    assert_eq!(status, 409, "{again}");
    // The operator finds it among the cancelled tasks.
    let listed = stack
        .get_json("/v1/tasks?state=failed&status=cancelled&pool=alpha")
        .await;
    assert_eq!(listed["tasks"][0]["task_id"], "queued-1", "{listed}");
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // The busy task ends, the worker takes the task after the cancelled one, and never
    // the cancelled one.
    let next = stack.get_json("/v1/tasks/queued-2/result?wait_s=30").await;
    assert_eq!(next["status"], "ok", "{next}");
    assert_eq!(started.lock().unwrap().as_slice(), ["busy-1", "queued-2"]);
    assert_eq!(
        crate::common::stream_messages(&stack.client, "FLEET_WORK").await,
        0,
        "the cancelled task's message left the work stream"
    );
    assert_eq!(
        stack.metric("fleet_queued_tasks_cancelled_total").await,
        1.0
    );
    worker.shutdown().await;

    // Beta has no worker: a consumer that takes its task and holds it, as a worker that
    // has not yet said it runs the task would, makes the cancel a 409.
    submit(&stack.client, "held-1", "beta").await;
    eventually("the task waits in beta's queue", WAIT, async || {
        stack.get_json("/v1/tasks/held-1").await["state"] == "dispatched"
    })
    .await;
    let js = async_nats::jetstream::new(stack.client.clone());
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("pool-beta", "FLEET_WORK")
        .await
        .unwrap();
    let mut held = consumer.fetch().max_messages(1).messages().await.unwrap();
    let msg = held.next().await.unwrap().unwrap();
    let (status, refused) = cancel("held-1").await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("has been handed task held-1")),
        "{refused}"
    );
    let r = stack.get("/v1/tasks/held-1/result").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "no result was published");
    assert_eq!(
        crate::common::stream_messages(&stack.client, "FLEET_WORK").await,
        1,
        "the held task's message stays"
    );
    // A copy of a cancelled task's work message that reaches a worker anyway, as one
    // would if the cancel's delete had not happened, is acked without running: its
    // attempt has a result, the cancel's.
    submit(&stack.client, "late-1", "beta").await;
    let seq = {
        let mut seq = None;
        eventually("the task waits in beta's queue", WAIT, async || {
            seq = stack.get_json("/v1/tasks/late-1").await["work_sequence"].as_u64();
            seq.is_some()
        })
        .await;
        seq.unwrap()
    };
    let work = js.get_stream("FLEET_WORK").await.unwrap();
    let copy = work.get_raw_message(seq).await.unwrap();
    let (status, ack) = cancel("late-1").await;
    assert_eq!(status, 200, "{ack}");
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in copy.headers.iter() {
        let name: &str = name.as_ref();
        if name != "Nats-Msg-Id" {
            headers.insert(name, values[0].as_str());
        }
    }
    js.publish_with_headers("fleet.work.beta", headers, copy.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let (late, late_started) =
        slow_worker(&stack.client, "beta", "b1", Duration::from_secs(1)).await;
    eventually(
        "the worker took the copy and acked it unrun",
        WAIT,
        async || {
            late.stats()
                .skipped_duplicates
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        },
    )
    .await;
    assert!(late_started.lock().unwrap().is_empty(), "nothing ran");
    let result = stack.get_json("/v1/tasks/late-1/result").await;
    assert_eq!(result["status"], "cancelled", "{result}");
    late.shutdown().await;
    drop(msg);
}

/// `purge_pool` (through `commander ctl`) cancels every task that waits in the pool's
/// queue, oldest first, and leaves the running one be: none of them runs, each producer
/// reads `cancelled`, and the operator finds them among the cancelled tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_purges_a_pool_s_queue_and_the_running_task_goes_on() {
    let stack = Stack::start(TWO_POOLS).await;
    // Busy for longer than the test: it is cancelled at the end.
    let (worker, started) = slow_worker(&stack.client, "alpha", "a1", WAIT).await;
    submit(&stack.client, "busy-1", "alpha").await;
    eventually("the worker runs the first task", WAIT, async || {
        stack.get_json("/v1/workers/a1").await["current_task"] == "busy-1"
    })
    .await;
    let queued: Vec<String> = (0..20).map(|i| format!("flood-{i:02}")).collect();
    for id in &queued {
        submit(&stack.client, id, "alpha").await;
    }
    eventually("the flood waits in alpha's queue", WAIT, async || {
        let listed = stack.get_json("/v1/pools").await;
        listed["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "alpha"))
            .is_some_and(|p| p["queue"]["pending"] == 20)
    })
    .await;
    let api = stack.commander.http().to_string();
    let purge = |pool| ["--reason", "flood", "purge-pool", "--pool", pool];
    let out = ctl(&api, None, &purge("alpha")).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ack["ok"], true, "{ack}");
    let state = &ack["state"];
    assert_eq!(state["cancelled"], 20, "{ack}");
    // Oldest first in the work stream: the order of dispatch, which concurrent
    // classification can make differ a little from the order of submission.
    let mut purged: Vec<String> = serde_json::from_value(state["task_ids"].clone()).unwrap();
    purged.sort();
    assert_eq!(purged, queued, "{ack}");
    assert_eq!(state["more"], false, "{ack}");
    assert_eq!(state["not_cancelled"], json!([]), "{ack}");
    let result = stack.get_json("/v1/tasks/flood-07/result").await;
    assert_eq!(result["status"], "cancelled", "{result}");
    assert!(
        result["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pool alpha's queue: flood")),
        "{result}"
    );
    eventually(
        "every purged task is recorded cancelled",
        WAIT,
        async || {
            let listed = stack
                .get_json("/v1/tasks?state=failed&status=cancelled&pool=alpha")
                .await;
            listed["tasks"].as_array().map(Vec::len) == Some(20)
        },
    )
    .await;
    // The running task went on; once it ends, nothing else reaches the worker.
    assert_eq!(
        stack.get_json("/v1/workers/a1").await["current_task"],
        "busy-1"
    );
    let r = stack
        .post("/v1/control")
        .json(&json!({"command": "cancel", "task_id": "busy-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let done = stack.get_json("/v1/tasks/busy-1/result?wait_s=30").await;
    assert_eq!(done["worker_id"], "a1", "{done}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(started.lock().unwrap().as_slice(), ["busy-1"]);
    assert_eq!(
        crate::common::stream_messages(&stack.client, "FLEET_WORK").await,
        0
    );
    assert_eq!(
        stack.metric("fleet_queued_tasks_cancelled_total").await,
        20.0
    );
    // An empty queue purges nothing; a pool the config does not know is a 404.
    let again = ctl(&api, None, &purge("alpha")).await;
    let ack: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(ack["state"]["cancelled"], 0, "{ack}");
    let unknown = ctl(&api, None, &purge("gamma")).await;
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains("404") && said.contains("pool gamma is not configured"),
        "{said}"
    );
    worker.shutdown().await;
}

/// `/metrics` passes the real `promtool check metrics`, and every metric the shipped
/// Grafana board queries is on it; the board has the structure Grafana provisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_the_grafana_board_reads_only_metrics_that_exist() {
    let stack = Stack::start(TWO_POOLS).await;
    let (worker, _) = slow_worker(&stack.client, "alpha", "a1", Duration::from_millis(5)).await;
    submit(&stack.client, "m-1", "alpha").await;
    eventually("the task completes", WAIT, async || {
        task_record(stack.commander.http(), "m-1")
            .await
            .is_some_and(|r| r["state"] == "completed")
    })
    .await;
    // The owner counts the finish a moment after the record says so.
    eventually("the dispatch latency is observed", WAIT, async || {
        stack
            .metric("fleet_dispatch_latency_seconds_count{pool=\"alpha\"}")
            .await
            >= 1.0
    })
    .await;
    let text = stack.metrics_text().await;

    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) on PATH, or PROMTOOL_BIN");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let board: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dashboards/grafana/fleet-commander.json")).unwrap(),
    )
    .unwrap();
    assert!(
        board["schemaVersion"].as_u64().unwrap() >= 39,
        "a current schema"
    );
    assert_eq!(board["uid"], "fleet-commander");
    let vars = board["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["type"] == "datasource").unwrap();
    assert_eq!(ds["query"], "prometheus");
    let typed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let panels = board["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Agents by state",
        "Tokens / s",
        "Tasks / min",
        "Burn rate",
        "Error rate (5 min)",
        "Queue depth by pool",
        "Model distribution",
        "Alerts firing",
        "Dispatch latency",
        "Decisions by rule",
        "Context utilisation",
    ] {
        assert!(titles.contains(&want), "panel {want} missing: {titles:?}");
    }
    let name = regex::Regex::new(r"\bfleet_[a-z0-9_]+").unwrap();
    let mut used = BTreeSet::new();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            for m in name.find_iter(t["expr"].as_str().unwrap()) {
                used.insert(m.as_str().to_string());
            }
        }
    }
    for m in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s).filter(|b| typed.contains(b)))
            .unwrap_or(m);
        assert!(
            typed.contains(base),
            "the board queries {m}, which /metrics does not have"
        );
    }
    assert!(used.len() >= 12, "{used:?}");

    // The scrape example is a valid Prometheus config (with a real credentials file).
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("viewer.token");
    std::fs::write(&token, "view-token").unwrap();
    let scrape = std::fs::read_to_string(root.join("dashboards/prometheus/scrape.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/fleet-viewer.token",
            &token.display().to_string(),
        );
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(&cfg, scrape).unwrap();
    let out = std::process::Command::new(promtool())
        .args(["check", "config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    worker.shutdown().await;
}

/// A pool taken out of the config keeps its queue in the work stream, and the tasks that
/// wait there with it. After the restart they are shown (`GET /v1/pools`: the pool, not
/// configured, with its queue), alerted (`queue_unserved`: no worker is there to take
/// them) and purged by an operator, each with a `cancelled` result its producer reads;
/// then the alert resolves. Before, the commander no longer looked at that queue: the
/// tasks waited there unseen, with no alert, and `purge-pool` answered 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_taken_out_of_the_config_leaves_its_waiting_tasks_in_sight() {
    let (_policies, fast) = fast_alerts("[alerts]\npending_s = 1\nresolve_s = 1\n");
    let mut stack = Stack::start(&format!("{TWO_POOLS}{fast}")).await;
    let waiting: Vec<String> = (0..3).map(|i| format!("left-{i}")).collect();
    for id in &waiting {
        submit(&stack.client, id, "beta").await;
    }
    for id in &waiting {
        eventually("dispatched to beta", WAIT, async || {
            task_record(stack.commander.http(), id)
                .await
                .is_some_and(|r| r["state"] == "dispatched")
        })
        .await;
    }
    // No worker of beta has run: with beta configured the alert already tells.
    eventually("beta's waiting tasks are alerted", WAIT, async || {
        unserved_alert(&stack, "beta").await.is_some()
    })
    .await;

    // beta leaves the config.
    assert_eq!(stack.commander.terminate(WAIT), Some(0));
    let alpha_only = TWO_POOLS.split("[pools.beta]").next().unwrap().to_string();
    stack.commander = fleet_testkit::Commander::start(&crate::common::commander_options(
        &stack.nats,
        stack.dir.path().join("cmd"),
        &format!("{alpha_only}{fast}"),
    ))
    .expect("the commander, restarted without beta");
    let mut beta = Value::Null;
    eventually("beta's queue is listed", WAIT, async || {
        beta = stack.get_json("/v1/pools").await["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "beta").cloned())
            .unwrap_or(Value::Null);
        beta["queue"]["pending"] == 3
    })
    .await;
    assert_eq!(beta["configured"], false, "{beta}");
    let mut alert = None;
    eventually("the alert names the pool", WAIT, async || {
        alert = unserved_alert(&stack, "beta").await;
        alert.is_some()
    })
    .await;
    let alert = alert.unwrap();
    assert_eq!(alert["severity"], "warning", "{alert}");
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not configured") && message.contains("3 tasks"),
        "{alert}"
    );
    assert!(
        stack
            .commander
            .log_text()
            .contains("tasks wait in the queue of a pool that is not configured"),
        "the commander warns in its log"
    );

    let api = stack.commander.http().to_string();
    let out = ctl(&api, None, &["purge-pool", "--pool", "beta"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ack["state"]["cancelled"], 3, "{ack}");
    for id in &waiting {
        let result = stack.get_json(&format!("/v1/tasks/{id}/result")).await;
        assert_eq!(result["status"], "cancelled", "{result}");
    }
    eventually("the alert resolves", WAIT, async || {
        unserved_alert(&stack, "beta").await.is_none()
    })
    .await;
    // A pool with neither a config entry nor a queue is still unknown.
    let out = ctl(&api, None, &["purge-pool", "--pool", "gamma"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not configured"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A policy directory holding `alerts` (kept while the returned directory lives), and the
/// config that reads it with the detector and the queue poll five times a second.
fn fast_alerts(alerts: &str) -> (tempfile::TempDir, String) {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("alerts.policy.toml"), alerts).unwrap();
    let config = format!(
        "[detect]\ninterval_ms = 200\n[telemetry]\nqueue_poll_ms = 200\n[policy]\ndir = {:?}\n",
        policies.path().display().to_string()
    );
    (policies, config)
}

/// The open `queue_unserved` alert on `pool`, if any.
async fn unserved_alert(stack: &Stack, pool: &str) -> Option<Value> {
    stack.get_json("/v1/alerts?rule=queue_unserved").await["alerts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["labels"]["pool"] == pool).cloned())
}

/// A worker started with a pool the config does not name (a misspelt `--pool`) gets no
/// routed task: the commander says so in its log when it first hears the worker, and the
/// pool's `over_provisioned` alert says it is not configured. Before, the worker idled with
/// nothing but an info alert, 15 minutes later, calling the pool over-provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_a_pool_that_is_not_configured_is_named() {
    let (_policies, fast) = fast_alerts("[alerts]\npending_s = 1\nover_provisioned_for_s = 1\n");
    // Lost 3 s after its last heartbeat (it sends one a second), forgotten 2 s later.
    let forget = "[fleet]\nlost_after_ms = 3000\nretention_ms = 2000\n";
    let stack = Stack::start(&format!("{TWO_POOLS}{fast}{forget}")).await;
    let (_seen, worker) = crate::common::watched_worker(&stack.client, "alpah", "typo-1", 1).await;
    eventually("the commander names the pool", WAIT, async || {
        stack.commander.log_text().contains(
            "a worker heartbeats for a pool that is not configured: the commander routes it no task",
        )
    })
    .await;
    let log = stack.commander.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("a worker heartbeats for a pool that is not configured"))
        .unwrap();
    assert!(
        line.contains("pool=\"alpah\"")
            && line.contains("worker=\"typo-1\"")
            && line.contains("alpha, beta"),
        "{line}"
    );
    let mut message = String::new();
    eventually("over_provisioned says it", WAIT, async || {
        let open = stack.get_json("/v1/alerts?rule=over_provisioned").await;
        message = open["alerts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["labels"]["pool"] == "alpah"))
            .and_then(|a| a["message"].as_str())
            .unwrap_or_default()
            .to_string();
        !message.is_empty()
    })
    .await;
    assert!(
        message.contains("(not configured: the commander routes it no task)"),
        "{message}"
    );
    let listed = async || {
        let pools = stack.get_json("/v1/pools").await;
        let metrics = stack.metrics_text().await;
        let in_pools = pools["pools"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "alpah"));
        (in_pools, metrics.contains("pool=\"alpah\""))
    };
    assert_eq!(listed().await, (true, true));
    // The worker stopped (the typo found), the pool goes as its worker does: from the
    // list and from /metrics, while the configured pools stay.
    worker.shutdown().await;
    eventually("the pool is forgotten", WAIT, async || {
        listed().await == (false, false)
    })
    .await;
    let pools = stack.get_json("/v1/pools").await;
    let names: Vec<&str> = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(
        stack
            .commander
            .log_text()
            .contains("pool that is not configured forgotten"),
        "the log says so"
    );
}
