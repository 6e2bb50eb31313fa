//! Detection on the real binary: alerts raised from real workers' telemetry reach NATS,
//! the API, `/metrics`, a real Alertmanager and a signed webhook; silences mute them; the
//! escalation ladder throttles, pauses, blocks and cancels, and lets go when they resolve.

use std::time::Duration;

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use base64::Engine as _;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::common::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A webhook receiver that keeps each request whose Standard Webhooks signature verifies
/// against `SECRET` (and counts the ones that do not).
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>, Arc<Mutex<u32>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let bad: Arc<Mutex<u32>> = Arc::default();
    let (g, b) = (got.clone(), bad.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let (g, b) = (g.clone(), b.clone());
            async move {
                let h = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let key = base64::engine::general_purpose::STANDARD
                    .decode(SECRET.trim_start_matches("whsec_"))
                    .unwrap();
                let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                mac.update(
                    format!("{}.{}.{body}", h("webhook-id"), h("webhook-timestamp")).as_bytes(),
                );
                let want = format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
                );
                if h("webhook-signature").split(' ').any(|s| s == want) {
                    g.lock().unwrap().push(serde_json::from_str(&body).unwrap());
                } else {
                    *b.lock().unwrap() += 1;
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got, bad)
}

/// The `type` of each webhook call received, in order.
fn webhook_types(received: &Mutex<Vec<Value>>) -> Vec<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["type"].as_str().unwrap().to_string())
        .collect()
}

/// Two pools, the detector every 200 ms, alerts resolved after 1 s (a policy file in
/// `dir`), and the signed webhook sink `hook`.
fn quick_alerts_with_webhook(dir: &std::path::Path, hook: &str) -> String {
    std::fs::write(dir.join("alerts.policy.toml"), "[alerts]\nresolve_s = 1\n").unwrap();
    format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[[detect.sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = {hook:?}\nsecret_env = \"FLEET_E2E_WEBHOOK_SECRET\"\n[policy]\ndir = {:?}\n",
        dir.display().to_string()
    )
}

async fn next_event(sub: &mut async_nats::Subscriber, event: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("an alert message in time")
            .expect("the subscription stays open");
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["event"] == event && v["alert"]["rule"] == "context_critical" {
            assert_eq!(msg.subject.as_str(), "fleet.alerts.critical");
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_context_fires_context_critical_everywhere_and_resolves_when_it_empties() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, received, bad_signatures) = webhook_receiver().await;
    let toml = quick_alerts_with_webhook(dir.path(), &hook);
    let stack = Stack::start_with_env(&toml, &[("FLEET_E2E_WEBHOOK_SECRET", SECRET)]).await;
    let mut sub = stack.client.subscribe("fleet.alerts.>").await.unwrap();
    stack.client.flush().await.unwrap();
    // `commander alerts tail` prints what the detector raises from now on.
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_commander"))
        .args([
            "alerts",
            "tail",
            "--json",
            "--count",
            "1",
            "--severity",
            "critical",
        ])
        .args(["--nats-url", stack.nats.url()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tail_err = std::io::BufReader::new(tail.stderr.take().unwrap());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in tail_err.lines().map_while(Result::ok) {
            if line.contains("tailing alerts") {
                let _ = ready_tx.send(());
            }
        }
    });
    assert!(
        ready.recv_timeout(WAIT).is_ok(),
        "alerts tail did not start"
    );
    let tail_out = tail.stdout.take().unwrap();
    let tailed = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(tail_out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    // 124,000 of 128,000 tokens: 97 %, above the critical 95 %.
    let full = heartbeats(stack.client.clone(), "ctx-1", "alpha", 124_000);
    let fired = next_event(&mut sub, "firing").await;
    let a = &fired["alert"];
    assert_eq!(a["severity"], "critical", "{fired}");
    assert_eq!(a["state"], "firing");
    assert_eq!(a["labels"]["worker"], "ctx-1");
    assert_eq!(a["links"]["task"], "t-ctx");
    assert!(a["message"].as_str().unwrap().contains("97%"), "{fired}");
    let id = a["id"].as_str().unwrap().to_string();
    // The tail printed the same alert and exited after its one message.
    let lines = tailed.join().unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let printed: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(printed["event"], "firing");
    assert_eq!(printed["alert"]["id"], id.as_str());
    assert!(tail.wait().unwrap().success());

    let open = stack.get_json("/v1/alerts").await;
    let listed = open["alerts"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|x| x["id"] == id.as_str() && x["state"] == "firing"),
        "{open}"
    );
    assert_eq!(
        stack
            .metric("fleet_alerts_firing{rule=\"context_critical\",severity=\"critical\"}")
            .await,
        1.0
    );

    // The context empties: below the resolve level for resolve_s, then resolved.
    full.abort();
    let calm = heartbeats(stack.client.clone(), "ctx-1", "alpha", 1_000);
    let resolved = next_event(&mut sub, "resolved").await;
    assert_eq!(resolved["alert"]["id"], id.as_str());
    assert_eq!(resolved["alert"]["ended_reason"], "recovered");
    let states: Vec<&str> = resolved["alert"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "firing", "resolved"]);
    calm.abort();

    let log = stack
        .get_json("/v1/alerts?state=resolved&rule=context_critical")
        .await;
    assert_eq!(log["alerts"][0]["id"], id.as_str(), "{log}");
    eventually("the gauge drops", WAIT, async || {
        stack
            .metric("fleet_alerts_firing{rule=\"context_critical\",severity=\"critical\"}")
            .await
            == 0.0
    })
    .await;
    // The signed webhook got the firing and the resolved event, each verified.
    eventually("both events reach the webhook", WAIT, async || {
        received.lock().unwrap().len() >= 2
    })
    .await;
    let types = webhook_types(&received);
    assert_eq!(types, ["alert.firing", "alert.resolved"]);
    assert_eq!(*bad_signatures.lock().unwrap(), 0);
    let sinks = stack.get_json("/v1/alerts/sinks").await;
    assert_eq!(sinks["sinks"][0]["delivered"], 2, "{sinks}");
    assert_eq!(sinks["sinks"][0]["enabled"], true);
    assert!(
        !sinks.to_string().contains("/hook"),
        "the URL's path is not shown: {sinks}"
    );
    // A bad filter is a 400 in the one error shape.
    let r = reqwest::get(stack.http("/v1/alerts?state=loud"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// The context_critical messages on `fleet.alerts.>` within `window`.
async fn alert_events(sub: &mut async_nats::Subscriber, window: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, sub.next()).await {
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["alert"]["rule"] == "context_critical" {
            got.push(v);
        }
    }
    got
}

/// Two replicas on one NATS read the same telemetry and raise the same alert; one of them,
/// the one holding the lead, notifies it (docs/alerts.md, "Several replicas"): one message
/// and one webhook call, not one per replica. When it dies, the other takes the lead, sends
/// the alert as it sees it, and then its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_notify_an_alert_once_and_the_survivor_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, received, bad_signatures) = webhook_receiver().await;
    let toml = quick_alerts_with_webhook(dir.path(), &hook);
    let nats = fleet_testkit::NatsServer::start().expect("nats-server");
    let start = |name: &str| {
        let mut o = commander_options(&nats, dir.path().join(name), &toml);
        o.extra_env = vec![("FLEET_E2E_WEBHOOK_SECRET".into(), SECRET.into())];
        fleet_testkit::Commander::start(&o).expect("commander")
    };
    let mut replicas = [start("a"), start("b")];
    let apis: Vec<String> = replicas.iter().map(|c| c.http().to_string()).collect();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut sub = client.subscribe("fleet.alerts.>").await.unwrap();
    client.flush().await.unwrap();
    let leader = leader_of(&apis).await;

    // 124,000 of 128,000 tokens: context_critical on both replicas, sent by one.
    let full = heartbeats(client.clone(), "ctx-1", "alpha", 124_000);
    let fired = next_event(&mut sub, "firing").await;
    let firing_on = async |api: &str| {
        reqwest::get(format!("{api}/v1/alerts?rule=context_critical"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["alerts"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["state"] == "firing").cloned())
    };
    eventually("both replicas raise it", WAIT, async || {
        firing_on(&apis[0]).await.is_some() && firing_on(&apis[1]).await.is_some()
    })
    .await;
    let leaders_alert = firing_on(&apis[leader]).await.unwrap();
    assert_eq!(fired["alert"]["id"], leaders_alert["id"], "{fired}");
    let more = alert_events(&mut sub, Duration::from_secs(2)).await;
    assert!(more.is_empty(), "sent once, not once per replica: {more:?}");
    eventually("the webhook hears it once", WAIT, async || {
        received.lock().unwrap().len() == 1
    })
    .await;

    // The leader dies: the other takes the lead and sends the alert as it sees it.
    replicas[leader].kill9();
    let survivor = &apis[1 - leader];
    let taken = next_event(&mut sub, "firing").await;
    let its_alert = firing_on(survivor).await.unwrap();
    assert_eq!(taken["alert"]["id"], its_alert["id"], "{taken}");
    assert_eq!(metric_at(survivor, "fleet_alerts_leader").await, 1.0);

    // It ends: the survivor sends the end of the alert it sent.
    full.abort();
    let calm = heartbeats(client.clone(), "ctx-1", "alpha", 1_000);
    let resolved = next_event(&mut sub, "resolved").await;
    assert_eq!(resolved["alert"]["id"], its_alert["id"]);
    calm.abort();
    eventually(
        "the webhook hears the take-over and the end",
        WAIT,
        async || received.lock().unwrap().len() == 3,
    )
    .await;
    let types = webhook_types(&received);
    assert_eq!(types, ["alert.firing", "alert.firing", "alert.resolved"]);
    assert_eq!(*bad_signatures.lock().unwrap(), 0);
}

/// An operator silences one agent: its alert still lives (in `/v1/alerts`, with
/// `silenced_by`) but is not published; another agent's is. Silences need the operator
/// role and say who made and who ended them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silenced_agents_alert_is_kept_but_not_sent() {
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[[auth.tokens]]\nname = \"ops\"\nrole = \"operator\"\ntoken_env = \"FLEET_OPS_TOKEN\"\n"
    );
    let stack = Stack::start_with_env(&toml, &[("FLEET_OPS_TOKEN", "ops-token")])
        .await
        .with_token("ops-token");
    let http = reqwest::Client::new();
    let body = serde_json::json!({"matchers": {"worker": "ctx-2"}, "duration_s": 600,
                                  "author": "alice", "comment": "resizing ctx-2"});
    let r = http
        .post(stack.http("/v1/silences"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "no token");
    let r = http
        .post(stack.http("/v1/silences"))
        .bearer_auth("ops-token")
        .json(&serde_json::json!({"matchers": {}, "duration_s": 600, "author": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        400,
        "a silence of everything is refused"
    );
    // A silence that could never match is refused too, not kept as a silence of nothing.
    let r = http
        .post(stack.http("/v1/silences"))
        .bearer_auth("ops-token")
        .json(
            &serde_json::json!({"matchers": {"severity": "page"}, "duration_s": 600,
                                  "author": "alice"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let refused: Value = r.json().await.unwrap();
    assert_eq!(
        refused["error"]["message"],
        "matchers.severity \"page\" is not a severity (info, warning, critical)"
    );
    // Silences are kept 10,000 deep: each one's text is bounded, not just the body.
    let r = http
        .post(stack.http("/v1/silences"))
        .bearer_auth("ops-token")
        .json(
            &serde_json::json!({"matchers": {"worker": "ctx-2"}, "duration_s": 600,
                                  "author": "alice", "comment": "c".repeat(1_001)}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "a comment over 1,000 characters");
    // Sent as `curl -d` sends it, labelled form-encoded: the body is read as JSON anyway.
    let r = http
        .post(stack.http("/v1/silences"))
        .bearer_auth("ops-token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let silence: Value = r.json().await.unwrap();
    let sid = silence["id"].as_str().unwrap().to_string();

    let mut sub = stack.client.subscribe("fleet.alerts.>").await.unwrap();
    stack.client.flush().await.unwrap();
    let a = heartbeats(stack.client.clone(), "ctx-2", "alpha", 124_000);
    let b = heartbeats(stack.client.clone(), "ctx-3", "alpha", 124_000);
    // ctx-2 comes first in every tick; the first message must be ctx-3's.
    let fired = next_event(&mut sub, "firing").await;
    assert_eq!(fired["alert"]["labels"]["worker"], "ctx-3", "{fired}");
    let open = stack.get_json("/v1/alerts?rule=context_critical").await;
    let muted = open["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["labels"]["worker"] == "ctx-2")
        .unwrap_or_else(|| panic!("{open}"))
        .clone();
    assert_eq!(muted["silenced_by"], sid.as_str());
    assert_eq!(muted["state"], "firing");
    assert!(stack.metric("fleet_alerts_silenced_total").await >= 1.0);

    // Ended by hand: kept, with who ended it.
    let r = http
        .delete(stack.http(&format!("/v1/silences/{sid}")))
        .bearer_auth("ops-token")
        .header("fleet-identity", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let all = stack.get_json("/v1/silences").await;
    assert_eq!(all["silences"][0]["expired_by"], "ops (bob)", "{all}");
    assert_eq!(all["silences"][0]["active"], false);
    assert_eq!(all["silences"][0]["author"], "alice");
    a.abort();
    b.abort();
}

/// The escalation ladder on the real binary with a real SDK worker: a task that fills the
/// context raises `context_critical` on the worker that ran it; step 1 throttles that
/// worker at once, step 2 pauses it two seconds later (the worker answers each command, and
/// its heartbeat says paused). An operator reverts the pause by hand (it is not applied
/// again); the worker takes work again, its context empties, the alert resolves and the
/// throttle is lifted by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ladder_throttles_then_pauses_a_worker_and_undoes_it_when_the_alert_resolves() {
    use fleet_worker::{
        LlmCall, Producer, Subjects, SubmitOptions, Task, TaskOutput, Worker, WorkerConfig,
    };

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ladder.policy.toml"),
        r#"
[alerts]
resolve_s = 1

[[escalation]]
name = "brake"
rules = ["context_critical"]
severity = "critical"
action = "throttle"
tasks_per_s = 2.0

[[escalation]]
name = "stop"
rules = ["context_critical"]
severity = "critical"
after_s = 2
action = "pause"

[[escalation]]
name = "guard"
rules = ["context_critical"]
severity = "critical"
after_s = 2
action = "block"
block = "pool"
"#,
    )
    .unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[policy]\ndir = {:?}\n",
        dir.path().display().to_string()
    );
    let stack = Stack::start_with_env(&toml, &[("FLEET_COMPLIANCE_TOKEN", "ops-token")]).await;
    let mut config = WorkerConfig::new("alpha", "ctl-1");
    config.model = Some("gpt-4o".into());
    config.provider = Some("openai".into());
    config.heartbeat_interval = Duration::from_millis(300);
    let worker = Worker::start(stack.client.clone(), config, |ctx| async move {
        // "fill" reports 124,000 of gpt-4o's 128,000 tokens (97 %); anything else 1,000.
        let input = if ctx.task.description == "fill" {
            124_000
        } else {
            1_000
        };
        ctx.telemetry
            .llm_call(&LlmCall::chat("openai", "gpt-4o").tokens(input, 10));
        Ok(TaskOutput::default())
    })
    .await
    .unwrap();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let submit = async |id: &str, text: &str| {
        let mut t = Task::new(text);
        t.id = Some(id.into());
        t.pool = Some("alpha".into());
        producer.submit(&t, SubmitOptions::default()).await.unwrap();
    };
    submit("fill-1", "fill").await;

    let active = async |step: &str| -> Option<Value> {
        let v = stack.get_json("/v1/interventions?state=active").await;
        v["interventions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["step"] == step)
            .cloned()
    };
    eventually("the throttle is in force and obeyed", WAIT, async || {
        active("brake")
            .await
            .is_some_and(|i| i["workers"][0]["ok"] == true)
    })
    .await;
    let brake = active("brake").await.unwrap();
    assert_eq!(brake["target"]["worker"], "ctl-1", "{brake}");
    assert_eq!(brake["rule"], "context_critical");
    assert_eq!(brake["level"], 4);
    assert_eq!(brake["workers"][0]["commands"][0], "throttle", "{brake}");
    // The dashboard gauges read the same snapshot.
    assert_eq!(
        stack
            .metric("fleet_workers_by_context_utilisation{bucket=\"95-100\"}")
            .await,
        1.0
    );
    assert_eq!(
        stack.metric("fleet_pool_capacity{pool=\"alpha\"}").await,
        8.0
    );
    assert!(stack.metric("fleet_burn_rate_usd_per_hour").await > 0.0);
    eventually(
        "the pause follows and the worker says paused",
        WAIT,
        async || {
            let paused = stack.get_json("/v1/workers/ctl-1").await["paused"] == true;
            paused
                && active("stop")
                    .await
                    .is_some_and(|i| i["workers"][0]["ok"] == true)
        },
    )
    .await;
    let stop = active("stop").await.unwrap();
    assert_eq!(stop["workers"][0]["commands"][0], "pause", "{stop}");
    assert_eq!(
        stack
            .metric("fleet_control_commands_total{action=\"pause\",outcome=\"ok\"}")
            .await,
        1.0
    );

    // Rung 5: the pool is refused new work while the guard is in force, and says why.
    let guard = active("guard").await.expect("the guard is in force");
    assert_eq!(guard["level"], 5, "{guard}");
    eventually("decisions refuse the pool", WAIT, async || {
        stack.get_json("/v1/interventions").await["blocks"][0]["value"] == "alpha"
    })
    .await;
    submit("blocked-1", "small").await;
    let r = producer.await_result("blocked-1", WAIT).await.unwrap();
    assert_eq!(r.status, fleet_worker::ResultStatus::Rejected, "{r:?}");
    let err = r.error.unwrap();
    assert_eq!(err.code, "blocked");
    assert!(
        err.message
            .starts_with("pool alpha is blocked by intervention context_critical:"),
        "{}",
        err.message
    );
    // An operator's revert (the compliance token; `who` in Fleet-Identity).
    let http = reqwest::Client::new();
    let revert = async |id: &str, who: &str| {
        http.post(stack.http(&format!("/v1/interventions/{id}/revert")))
            .bearer_auth("ops-token")
            .header("Fleet-Identity", who)
            .send()
            .await
            .unwrap()
    };
    let r = revert(guard["id"].as_str().unwrap(), "dave").await;
    assert_eq!(r.status().as_u16(), 200);
    eventually("decisions no longer refuse the pool", WAIT, async || {
        stack.get_json("/v1/interventions").await["blocks"] == serde_json::json!([])
    })
    .await;

    // Work waits while the worker is paused.
    submit("small-1", "small").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        task_record(stack.commander.http(), "small-1")
            .await
            .unwrap()["state"]
            != "completed"
    );

    // The operator lets it work again; the pause is not re-applied for this alert.
    let id = stop["id"].as_str().unwrap();
    let r = revert(id, "carol").await;
    assert_eq!(r.status().as_u16(), 200);
    let reverted: Value = r.json().await.unwrap();
    assert_eq!(reverted["state"], "reverted");
    assert_eq!(reverted["reverted_by"], "operator carol");
    let again = revert(id, "carol").await;
    assert_eq!(
        again.status().as_u16(),
        409,
        "only an active one can be reverted"
    );

    let r = producer.await_result("small-1", WAIT).await.unwrap();
    assert_eq!(r.worker_id.as_deref(), Some("ctl-1"));
    eventually(
        "the worker was told to resume for the reverted pause",
        WAIT,
        async || {
            let all = stack.get_json("/v1/interventions?state=reverted").await;
            all["interventions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["step"] == "stop" && i["workers"][0]["commands"][0] == "resume")
        },
    )
    .await;
    eventually(
        "the alert resolves and the throttle is lifted",
        WAIT,
        async || {
            let all = stack.get_json("/v1/interventions?state=reverted").await;
            all["interventions"].as_array().unwrap().iter().any(|i| {
                i["step"] == "brake"
                    && i["reverted_by"] == "alert resolved"
                    && i["workers"][0]["commands"][0] == "unthrottle"
                    && i["workers"][0]["ok"] == true
            })
        },
    )
    .await;
    assert!(active("stop").await.is_none(), "not applied again");
    assert_eq!(
        stack
            .metric("fleet_interventions_active{action=\"throttle\"}")
            .await,
        0.0
    );
    let all = stack.get_json("/v1/interventions").await;
    assert_eq!(all["interventions"].as_array().unwrap().len(), 3, "{all}");
    let r = reqwest::get(stack.http("/v1/interventions?state=sideways"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    worker.shutdown().await;
}

/// The alerts of a real Alertmanager's API (`GET /api/v2/alerts`) named `alertname`.
async fn alertmanager_alerts(am: &fleet_testkit::Alertmanager, alertname: &str) -> Vec<Value> {
    let url = format!(
        "{}/api/v2/alerts?filter=alertname%3D%22{alertname}%22",
        am.url()
    );
    let Ok(r) = reqwest::get(url).await else {
        return Vec::new();
    };
    r.json::<Vec<Value>>().await.unwrap_or_default()
}

/// Delivery to a real Alertmanager (Debian's `prometheus-alertmanager`): the firing alert
/// is in its API with the commander's labels and annotations, and the resolve ends it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_alertmanager_gets_the_alert_and_its_end() {
    let am = fleet_testkit::Alertmanager::start()
        .expect("alertmanager (apt-get install prometheus-alertmanager)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("alerts.policy.toml"),
        "[alerts]\nresolve_s = 1\n",
    )
    .unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[[detect.sinks]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = {:?}\n[policy]\ndir = {:?}\n",
        am.url(),
        dir.path().display().to_string()
    );
    let stack = Stack::start(&toml).await;
    let full = heartbeats(stack.client.clone(), "ctx-am", "alpha", 124_000);
    eventually("Alertmanager holds the firing alert", WAIT, async || {
        !alertmanager_alerts(&am, "context_critical")
            .await
            .is_empty()
    })
    .await;
    let got = alertmanager_alerts(&am, "context_critical").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let a = &got[0];
    assert_eq!(a["labels"]["worker"], "ctx-am", "{a}");
    assert_eq!(a["labels"]["severity"], "critical");
    assert_eq!(a["labels"]["source"], "fleet-commander");
    assert_eq!(a["status"]["state"], "active", "{a}");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("ctx-am"),
        "{a}"
    );
    let id = a["annotations"]["alert_id"].as_str().unwrap().to_string();
    assert!(
        a["generatorURL"]
            .as_str()
            .unwrap()
            .contains("/v1/alerts?rule=context_critical"),
        "{a}"
    );
    let open = stack.get_json("/v1/alerts").await;
    assert_eq!(open["alerts"][0]["id"], id.as_str(), "{open}");

    full.abort();
    let empty = heartbeats(stack.client.clone(), "ctx-am", "alpha", 1_000);
    eventually("the resolve ends it in Alertmanager", WAIT, async || {
        alertmanager_alerts(&am, "context_critical")
            .await
            .is_empty()
    })
    .await;
    let sinks = stack.get_json("/v1/alerts/sinks").await;
    assert_eq!(sinks["sinks"][0]["name"], "am", "{sinks}");
    assert!(
        sinks["sinks"][0]["delivered"].as_u64().unwrap() >= 2,
        "{sinks}"
    );
    assert_eq!(sinks["sinks"][0]["failed"], 0, "{sinks}");
    empty.abort();
}

/// An SDK worker stuck calling one tool with the same arguments: `tool_loop` warns on
/// NATS, `tool_loop_runaway` goes critical (NATS and a real Alertmanager), the shipped
/// policy's `end-tool-loops` step cancels the task (its result says cancelled, by which
/// intervention), and with the run over both alerts resolve, in Alertmanager too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_loop_warns_goes_critical_and_the_shipped_policy_cancels_the_task() {
    use fleet_worker::{
        Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskOutput, ToolCall, Worker,
        WorkerConfig,
    };

    let am = fleet_testkit::Alertmanager::start().expect("alertmanager");
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/default.policy.toml"
    ))
    .unwrap();
    let start = shipped
        .find("[[escalation]]\nname = \"end-tool-loops\"")
        .expect("the shipped step");
    let step = &shipped[start..];
    let step = &step[..step[1..].find("\n[").map_or(step.len(), |i| i + 1)];
    std::fs::write(
        dir.path().join("loops.policy.toml"),
        format!("[alerts]\nresolve_s = 1\n\n{step}\n"),
    )
    .unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[[detect.sinks]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = {:?}\n[policy]\ndir = {:?}\n",
        am.url(),
        dir.path().display().to_string()
    );
    let stack = Stack::start(&toml).await;
    let mut sub = stack.client.subscribe("fleet.alerts.>").await.unwrap();
    stack.client.flush().await.unwrap();
    let mut config = WorkerConfig::new("alpha", "loop-1");
    config.export.flush_interval = Duration::from_millis(100);
    let worker = Worker::start(stack.client.clone(), config, |ctx| async move {
        // The agent asks the same question again and again; only a cancel ends it.
        for _ in 0..150 {
            ctx.telemetry
                .tool_call(&ToolCall::new("web_search").arguments(r#"{"query": "same question"}"#));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(TaskOutput::default())
    })
    .await
    .unwrap();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut task = Task::new("find it");
    task.id = Some("looping".into());
    task.pool = Some("alpha".into());
    producer
        .submit(&task, SubmitOptions::default())
        .await
        .unwrap();

    let mut seen: Vec<(String, String, String)> = Vec::new();
    let mut next = async |want: (&str, &str)| loop {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("alert in time")
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        let (event, rule) = (
            v["event"].as_str().unwrap_or(""),
            v["alert"]["rule"].as_str().unwrap_or(""),
        );
        seen.push((msg.subject.to_string(), event.to_string(), rule.to_string()));
        if (event, rule) == want {
            return v;
        }
    };
    let warn = next(("firing", "tool_loop")).await;
    assert_eq!(warn["alert"]["labels"]["worker"], "loop-1", "{warn}");
    let crit = next(("firing", "tool_loop_runaway")).await;
    assert!(
        crit["alert"]["message"]
            .as_str()
            .unwrap()
            .contains("web_search with the same arguments"),
        "{crit}"
    );
    let r = producer.await_result("looping", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Cancelled, "{r:?}");
    let err = r.error.unwrap();
    assert_eq!(err.code, "cancelled");
    assert!(err.message.contains("end-tool-loops"), "{}", err.message);
    let ints = stack.get_json("/v1/interventions").await;
    let i = &ints["interventions"][0];
    assert_eq!(
        (
            &i["action"],
            &i["state"],
            &i["task_id"],
            &i["workers"][0]["ok"]
        ),
        (
            &Value::from("cancel_task"),
            &Value::from("done"),
            &Value::from("looping"),
            &Value::from(true)
        ),
        "{ints}"
    );
    next(("resolved", "tool_loop_runaway")).await;
    assert!(
        seen.iter()
            .any(|(s, e, r)| s == "fleet.alerts.warning" && e == "firing" && r == "tool_loop")
            && seen
                .iter()
                .any(|(s, _, r)| s == "fleet.alerts.critical" && r == "tool_loop_runaway"),
        "{seen:?}"
    );
    eventually(
        "Alertmanager holds no open runaway after the resolve",
        WAIT,
        async || {
            alertmanager_alerts(&am, "tool_loop_runaway")
                .await
                .is_empty()
        },
    )
    .await;
    let delivered = stack.get_json("/v1/alerts/sinks").await["sinks"][0]["delivered"]
        .as_u64()
        .unwrap();
    assert!(
        delivered >= 3,
        "tool_loop, the runaway and its end: {delivered}"
    );
    worker.shutdown().await;
}

/// A Slack-shaped endpoint that misbehaves in turn: a 500, a hang past the sink's
/// timeout, a 200 with garbage for a body, then 410 Gone for good.
async fn misbehaving_receiver() -> (String, Arc<Mutex<u32>>) {
    let calls: Arc<Mutex<u32>> = Arc::default();
    let c = calls.clone();
    let app = axum::Router::new().route(
        "/slack",
        axum::routing::post(move || {
            let c = c.clone();
            async move {
                let n = {
                    let mut n = c.lock().unwrap();
                    *n += 1;
                    *n
                };
                match n {
                    1 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom"),
                    2 => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        (axum::http::StatusCode::OK, "too late")
                    }
                    3 => (axum::http::StatusCode::OK, "\u{0}\u{1}{{not json"),
                    _ => (axum::http::StatusCode::GONE, "gone"),
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slack", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, calls)
}

/// The whole path for one misbehaving agent: an SDK worker loops on one tool while its
/// LLM calls write tokens at 40 × its task type's usual rate. `token_loop` and `tool_loop`
/// reach NATS, a real Alertmanager and a signed webhook receiver that verifies every
/// signature; the ladder throttles the worker, then pauses it; when the loop stops both
/// alerts resolve (in Alertmanager too) and the throttle and pause are lifted by
/// themselves. A sink that answers 500, hangs, sends garbage and then 410 is retried,
/// counted and disabled while the others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_agent_is_alerted_everywhere_throttled_paused_and_let_go_when_it_stops() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::SystemTime;

    use fleet_worker::{
        LlmCall, Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskOutput, ToolCall,
        Worker, WorkerConfig,
    };

    let am = fleet_testkit::Alertmanager::start().expect("alertmanager");
    let (hook, received, bad_signatures) = webhook_receiver().await;
    let (flaky, flaky_calls) = misbehaving_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ladder.policy.toml"),
        r#"
[alerts]
pending_s = 1
resolve_s = 1
# Only the warning: the runaway rung (and the shipped cancel) are another test's.
tool_loop_critical_calls = 1000

[[escalation]]
name = "brake"
rules = ["token_loop", "tool_loop"]
action = "throttle"
tasks_per_s = 1.0

[[escalation]]
name = "stop"
rules = ["tool_loop"]
after_s = 2
action = "pause"
"#,
    )
    .unwrap();
    let toml = format!(
        r#"{TWO_POOLS}
[detect]
interval_ms = 200

[[detect.sinks]]
name = "am"
kind = "alertmanager"
url = {am:?}

[[detect.sinks]]
name = "hook"
kind = "webhook"
url = {hook:?}
secret_env = "FLEET_E2E_WEBHOOK_SECRET"

[[detect.sinks]]
name = "flaky"
kind = "slack"
url = {flaky:?}
timeout_ms = 300

[policy]
dir = {dir:?}
"#,
        am = am.url(),
        dir = dir.path().display().to_string()
    );
    let stack = Stack::start_with_env(&toml, &[("FLEET_E2E_WEBHOOK_SECRET", SECRET)]).await;
    let mut sub = stack.client.subscribe("fleet.alerts.>").await.unwrap();
    stack.client.flush().await.unwrap();

    let looping = Arc::new(AtomicBool::new(true));
    let keep_going = looping.clone();
    let mut config = WorkerConfig::new("alpha", "loop-2");
    config.export.flush_interval = Duration::from_millis(100);
    config.heartbeat_interval = Duration::from_millis(300);
    let worker = Worker::start(stack.client.clone(), config, move |ctx| {
        let keep_going = keep_going.clone();
        async move {
            // Each call took a second: 50 output tokens usually, 2,000 in the loop.
            let call = |output: u64| {
                let mut c = LlmCall::chat("openai", "gpt-4o").tokens(500, output);
                c.started = SystemTime::now() - Duration::from_secs(1);
                c
            };
            if ctx.task.description != "loop" {
                ctx.telemetry.llm_call(&call(50));
                return Ok(TaskOutput::default());
            }
            for _ in 0..600 {
                if !keep_going.load(Ordering::SeqCst) {
                    break;
                }
                ctx.telemetry.llm_call(&call(2_000));
                ctx.telemetry
                    .tool_call(&ToolCall::new("web_search").arguments(r#"{"query": "same"}"#));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Ok(TaskOutput::default())
        }
    })
    .await
    .unwrap();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let submit = async |id: &str, text: &str| {
        let mut t = Task::new(text);
        t.id = Some(id.into());
        t.pool = Some("alpha".into());
        t.attributes.insert("task_type".into(), "research".into());
        producer.submit(&t, SubmitOptions::default()).await.unwrap();
    };
    // The task type's usual rate: three ordinary runs at about 50 tokens/s.
    for i in 0..3 {
        let id = format!("usual-{i}");
        submit(&id, "look it up").await;
        let r = producer.await_result(&id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Ok, "{r:?}");
    }
    eventually("the task type has a baseline rate", WAIT, async || {
        let f = stack.get_json("/v1/fleet").await;
        f["task_types"].as_array().into_iter().flatten().any(|t| {
            t["task_type"] == "research" && t["baseline_output_tokens_per_s"].as_f64().is_some()
        })
    })
    .await;

    submit("loop-task", "loop").await;
    let mut firing: Vec<Value> = Vec::new();
    while firing.len() < 2 {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("both alerts in time")
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["event"] == "firing"
            && ["token_loop", "tool_loop"].contains(&v["alert"]["rule"].as_str().unwrap_or(""))
        {
            assert_eq!(msg.subject.as_str(), "fleet.alerts.warning");
            assert_eq!(v["alert"]["labels"]["worker"], "loop-2", "{v}");
            if !firing
                .iter()
                .any(|f| f["alert"]["rule"] == v["alert"]["rule"])
            {
                firing.push(v);
            }
        }
    }
    let token = firing
        .iter()
        .find(|f| f["alert"]["rule"] == "token_loop")
        .unwrap();
    assert!(token["alert"]["value"].as_f64().unwrap() > 5.0, "{token}");
    assert!(
        token["alert"]["message"]
            .as_str()
            .unwrap()
            .contains("usual rate"),
        "{token}"
    );

    // Level 4: the throttle at once, then the pause, each answered by the worker.
    let active = async |step: &str, rule: &str| -> Option<Value> {
        let v = stack.get_json("/v1/interventions?state=active").await;
        v["interventions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["step"] == step && i["rule"] == rule)
            .cloned()
    };
    eventually("both alerts throttle the worker", WAIT, async || {
        for rule in ["token_loop", "tool_loop"] {
            if !active("brake", rule)
                .await
                .is_some_and(|i| i["workers"][0]["ok"] == true)
            {
                return false;
            }
        }
        true
    })
    .await;
    eventually(
        "then the pause, and the worker says paused",
        WAIT,
        async || {
            stack.get_json("/v1/workers/loop-2").await["paused"] == true
                && active("stop", "tool_loop")
                    .await
                    .is_some_and(|i| i["workers"][0]["ok"] == true)
        },
    )
    .await;

    // Delivered: in Alertmanager, and at the webhook with a signature that verifies.
    for rule in ["token_loop", "tool_loop"] {
        eventually(&format!("Alertmanager holds {rule}"), WAIT, async || {
            alertmanager_alerts(&am, rule)
                .await
                .iter()
                .any(|a| a["labels"]["worker"] == "loop-2")
        })
        .await;
        eventually(&format!("the webhook verified {rule}"), WAIT, async || {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|b| b["type"] == "alert.firing" && b["data"]["alert"]["rule"] == rule)
        })
        .await;
    }

    // The agent stops looping: its run ends, both alerts resolve and the ladder lets go.
    looping.store(false, Ordering::SeqCst);
    let r = producer.await_result("loop-task", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok, "{r:?}");
    eventually("both alerts resolve", WAIT, async || {
        let open = stack.get_json("/v1/alerts").await;
        !open["alerts"].as_array().unwrap().iter().any(|a| {
            ["token_loop", "tool_loop"].contains(&a["rule"].as_str().unwrap_or(""))
                && a["state"] != "resolved"
        })
    })
    .await;
    eventually(
        "the throttles and the pause are reverted by the resolve",
        WAIT,
        async || {
            let v = stack.get_json("/v1/interventions?state=reverted").await;
            let done = |step: &str, command: &str| {
                v["interventions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| {
                        i["step"] == step
                            && i["reverted_by"] == "alert resolved"
                            && i["workers"][0]["commands"]
                                .as_array()
                                .is_some_and(|c| c.contains(&Value::from(command)))
                            && i["workers"][0]["ok"] == true
                    })
                    .count()
            };
            done("brake", "unthrottle") == 2 && done("stop", "resume") == 1
        },
    )
    .await;
    eventually("the worker says it runs again", WAIT, async || {
        stack.get_json("/v1/workers/loop-2").await["paused"] == false
    })
    .await;
    submit("after", "look it up").await;
    let r = producer.await_result("after", WAIT).await.unwrap();
    assert_eq!(r.worker_id.as_deref(), Some("loop-2"));
    for rule in ["token_loop", "tool_loop"] {
        eventually(&format!("Alertmanager ends {rule}"), WAIT, async || {
            alertmanager_alerts(&am, rule).await.is_empty()
        })
        .await;
        eventually(&format!("the webhook got {rule}'s end"), WAIT, async || {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|b| b["type"] == "alert.resolved" && b["data"]["alert"]["rule"] == rule)
        })
        .await;
    }
    assert_eq!(*bad_signatures.lock().unwrap(), 0);

    // The misbehaving sink was retried through the 500 and the hang, delivered on the
    // garbage 200, and disabled by the 410; the others never waited for it.
    let sinks = stack.get_json("/v1/alerts/sinks").await;
    let flaky = sinks["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "flaky")
        .unwrap()
        .clone();
    assert_eq!(flaky["enabled"], false, "{flaky}");
    assert!(
        flaky["disabled_reason"].as_str().unwrap().contains("410"),
        "{flaky}"
    );
    assert!(flaky["errors"].as_u64().unwrap() >= 2, "{flaky}");
    assert!(flaky["delivered"].as_u64().unwrap() >= 1, "{flaky}");
    assert!(*flaky_calls.lock().unwrap() >= 4);
    for name in ["am", "hook"] {
        let s = sinks["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap();
        assert_eq!(
            (s["enabled"].clone(), s["failed"].clone()),
            (Value::from(true), Value::from(0)),
            "{s}"
        );
        assert!(
            s["delivered"].as_u64().unwrap() >= 4,
            "two firings and two ends: {s}"
        );
    }
    worker.shutdown().await;
}

/// Rung 4's restart: an SDK worker goes silent in the middle of its first attempt (its
/// heartbeats go on); `stuck_agent` fires and a `restart_task` step tells it to restart
/// the task. The worker aborts the handler and hands the delivery back; JetStream
/// delivers it again and the second attempt completes. The restart is in the decision log
/// beside the task's routing decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_agents_task_is_restarted_and_completes_on_its_next_delivery() {
    use fleet_worker::{
        LlmCall, Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskOutput, Worker,
        WorkerConfig,
    };

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("restart.policy.toml"),
        r#"
[alerts]
resolve_s = 1

[[escalation]]
name = "unstick"
rules = ["stuck_agent"]
action = "restart_task"
"#,
    )
    .unwrap();
    // A run silent for 1 s past 3 × its expected duration is STUCK (30 s by default).
    let toml = format!(
        "{TWO_POOLS}\n[fleet]\nmin_stuck_after_ms = 1000\n[detect]\ninterval_ms = 200\n[policy]\ndir = {:?}\n",
        dir.path().display().to_string()
    );
    let stack = Stack::start(&toml).await;
    let mut config = WorkerConfig::new("alpha", "sticky-1");
    config.export.flush_interval = Duration::from_millis(100);
    config.heartbeat_interval = Duration::from_millis(300);
    let worker = Worker::start(stack.client.clone(), config, |ctx| async move {
        ctx.telemetry
            .llm_call(&LlmCall::chat("openai", "gpt-4o").tokens(100, 10));
        if ctx.delivered == 1 {
            // The first attempt hangs: no span, no result.
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        Ok(TaskOutput {
            output: serde_json::json!({"delivered": ctx.delivered}),
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut task = Task::new("fetch the report");
    task.id = Some("hangs-once".into());
    task.pool = Some("alpha".into());
    // Stuck after 3 × 0.5 s without a span.
    task.expected_duration_s = Some(0.5);
    producer
        .submit(&task, SubmitOptions::default())
        .await
        .unwrap();

    let r = producer.await_result("hangs-once", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok, "{r:?}");
    assert_eq!(
        r.output["delivered"], 2,
        "the second delivery completed: {r:?}"
    );
    assert_eq!(
        worker
            .stats()
            .restarted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let ints = stack.get_json("/v1/interventions").await;
    let i = ints["interventions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["step"] == "unstick")
        .unwrap_or_else(|| panic!("{ints}"))
        .clone();
    assert_eq!(
        (
            &i["action"],
            &i["rule"],
            &i["task_id"],
            &i["workers"][0]["commands"][0],
            &i["workers"][0]["ok"]
        ),
        (
            &Value::from("restart_task"),
            &Value::from("stuck_agent"),
            &Value::from("hangs-once"),
            &Value::from("restart"),
            &Value::from(true)
        ),
        "{i}"
    );
    let noted = stack
        .get_json("/v1/decisions?outcome=intervened&rule=intervention_restart_task")
        .await;
    let d = &noted["decisions"][0];
    assert_eq!(d["task_id"], "hangs-once", "{noted}");
    assert_eq!(d["pool"], "alpha");
    assert!(
        d["reason"].as_str().unwrap().starts_with("restarted"),
        "{d}"
    );
    // The routing decision is still the task's own.
    let routed = stack.get_json("/v1/decisions/hangs-once").await;
    assert_eq!(routed["outcome"], "dispatched", "{routed}");
    eventually("the stuck alert resolves", WAIT, async || {
        let open = stack.get_json("/v1/alerts?rule=stuck_agent").await;
        let ended = stack
            .get_json("/v1/alerts?rule=stuck_agent&state=resolved")
            .await;
        open["alerts"] == serde_json::json!([])
            && ended["alerts"][0]["labels"]["worker"] == "sticky-1"
    })
    .await;
    worker.shutdown().await;
}
