//! Policies against the real binary: bad policies change nothing (file, HTTP, NATS), a
//! throttle holds its rate, budgets defer at the limit and release when it rises (across
//! a kill -9), shadow replay, and 10,000 tasks while throttles and budgets flip.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_testkit::{Commander, NatsServer};
use fleet_worker::{
    Producer, ResultStatus, Subjects, SubmitOptions, Task, TaskContext, TaskOutput,
};
use fleet_worker::{Worker, WorkerConfig, WorkerHandle};
use serde_json::Value;

use crate::common::*;

const TOKEN: &str = "compliance-secret";

/// A $50 daily budget for team `search` that defers.
const SEARCH_DAILY: &str = r#"
[[budget]]
name = "search-daily"
scope = "team"
match = "search"
window = "day"
limit_usd = 50.0
action = "defer"
"#;

struct PolicyStack {
    nats: NatsServer,
    commander: Commander,
    client: async_nats::Client,
    dir: tempfile::TempDir,
    policies: PathBuf,
    config: String,
}

impl PolicyStack {
    async fn start(policy: &str, extra_config: &str) -> Self {
        Self::start_laid_out(extra_config, |policies| {
            std::fs::write(policies.join("main.policy.toml"), policy).unwrap()
        })
        .await
    }

    /// `lay_out` writes the policy directory's files before the commander starts.
    async fn start_laid_out(extra_config: &str, lay_out: impl FnOnce(&Path)) -> Self {
        Self::start_released_every(200, extra_config, lay_out).await
    }

    /// With `policy.release_interval_ms = release_ms`.
    async fn start_released_every(
        release_ms: u64,
        extra_config: &str,
        lay_out: impl FnOnce(&Path),
    ) -> Self {
        let nats = NatsServer::start().expect("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        lay_out(&policies);
        let config = format!(
            "{TWO_POOLS}\n[policy]\ndir = {:?}\nrelease_interval_ms = {release_ms}\n{extra_config}\n",
            policies
        );
        let commander = Self::spawn(&nats, dir.path(), &config);
        let client = async_nats::connect(nats.url()).await.unwrap();
        Self {
            nats,
            commander,
            client,
            dir,
            policies,
            config,
        }
    }

    fn spawn(nats: &NatsServer, dir: &Path, config: &str) -> Commander {
        let mut opts = commander_options(nats, dir.join("cmd"), config);
        opts.extra_env
            .push(("FLEET_COMPLIANCE_TOKEN".into(), TOKEN.into()));
        Commander::start(&opts).expect("commander")
    }

    fn http(&self, path: &str) -> String {
        format!("{}{path}", self.commander.http())
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(self.http(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn version(&self) -> String {
        self.get("/v1/policy").await["version"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn put(&self, toml: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .put(self.http("/v1/policy"))
            .header("fleet-identity", "alice@compliance")
            .body(toml.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `/metrics` as text.
    async fn metrics(&self) -> String {
        reqwest::get(self.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `fleet_parked_tasks`: tasks a throttle parked until their turn.
    async fn parked(&self) -> f64 {
        sample_value(&self.metrics().await, "fleet_parked_tasks")
    }

    /// Writes the policy file and waits until a new version is in force.
    async fn write_policy(&self, toml: &str) -> String {
        let before = self.version().await;
        // Written whole and renamed in, as editors and config managers do.
        let tmp = self.policies.join(".main.tmp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, self.policies.join("main.policy.toml")).unwrap();
        let mut now = before.clone();
        eventually("the edit is in force", WAIT, async || {
            now = self.version().await;
            now != before
        })
        .await;
        now
    }
}

/// A worker that reports no usage: budgets settle each task at its estimate, so the
/// number a budget admits is exact.
async fn quiet_worker(
    client: &async_nats::Client,
    pool: &str,
    id: &str,
    seen: SeenLog,
) -> WorkerHandle {
    let mut cfg = WorkerConfig::new(pool, id);
    cfg.max_in_flight = 64;
    cfg.heartbeat_interval = Duration::from_secs(1);
    Worker::start(client.clone(), cfg, move |ctx: TaskContext| {
        let seen = seen.clone();
        async move {
            *seen
                .lock()
                .unwrap()
                .runs
                .entry((ctx.task_id.clone(), ctx.attempt))
                .or_default() += 1;
            Ok(TaskOutput {
                output: serde_json::json!({ "ok": true }),
                usage: None,
            })
        }
    })
    .await
    .expect("worker starts")
}

/// The strings of a JSON array, joined (JSON text would escape their quotes).
fn strings(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

fn summary_task(id: &str, priority: u8) -> Task {
    let mut t = Task::new("Summarise the quarterly incident report for the operations team");
    t.id = Some(id.to_string());
    t.pool = Some("alpha".into());
    t.priority = priority;
    t.attributes.insert("team".into(), "search".into());
    t
}

/// Submits every task at once (pipelined) and waits for their PubAcks.
async fn submit_all(producer: &Producer, tasks: impl IntoIterator<Item = Task>) {
    let mut acks = Vec::new();
    for t in tasks {
        acks.push(
            producer
                .submit_pipelined(&t, SubmitOptions::default())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// Waits for each task's result, one after another, and expects it ok.
async fn await_ok(producer: &Producer, ids: impl IntoIterator<Item = String>, why: &str) {
    for id in ids {
        let r = producer.await_result(&id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Ok, "{id}: {why}");
    }
}

/// When each task was let through: its dispatch decision's time, sorted.
async fn dispatch_times(s: &PolicyStack, ids: impl IntoIterator<Item = String>) -> Vec<u64> {
    let mut at = Vec::new();
    for id in ids {
        let d = s.get(&format!("/v1/decisions/{id}")).await;
        assert_eq!(d["outcome"], "dispatched", "{d}");
        at.push(d["at_ms"].as_u64().unwrap());
    }
    at.sort_unstable();
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_policies_are_refused_with_file_and_line_and_change_nothing() {
    let good = SEARCH_DAILY;
    let s = PolicyStack::start(good, "").await;
    let v1 = s.version().await;
    assert!(
        v1.starts_with('v'),
        "the directory's policy is versioned: {v1}"
    );
    let policy = s.get("/v1/policy").await;
    assert_eq!(policy["source"], "file");
    assert_eq!(policy["budgets"][0]["name"], "search-daily");

    // A broken edit: a syntax error, then an unknown field, a negative budget, an unknown
    // pool and model, and two overlapping budgets with conflicting actions.
    let file = s.policies.join("main.policy.toml");
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "syntax",
            "[[budget]\nname = 1\n".into(),
            &["main.policy.toml:1:"],
        ),
        (
            "unknown field",
            format!("{good}colour = \"red\"\n"),
            &["main.policy.toml:", "colour"],
        ),
        (
            "negative budget",
            good.replace("50.0", "-1.0"),
            // The line of the key at fault, not the entry's header.
            &["main.policy.toml:7:", "limit_usd -1"],
        ),
        (
            "unknown pool and model",
            format!(
                "{good}\n[[budget]]\nname = \"p\"\nscope = \"pool\"\nmatch = \"gamma\"\nwindow = \"day\"\nlimit_usd = 1.0\naction = \"defer\"\n\n[[budget]]\nname = \"m\"\nscope = \"model\"\nmatch = \"gpt-11\"\nwindow = \"day\"\nlimit_usd = 1.0\naction = \"defer\"\n"
            ),
            &[
                "main.policy.toml:13:",
                "unknown pool \"gamma\"",
                "main.policy.toml:21:",
                "unknown model \"gpt-11\"",
            ],
        ),
        (
            "conflicting overlap",
            format!(
                "{good}\n[[budget]]\nname = \"all-teams\"\nscope = \"team\"\nwindow = \"day\"\nlimit_usd = 9.0\naction = \"reject\"\n"
            ),
            &[
                "main.policy.toml:10:",
                "overlaps budget search-daily",
                "conflicting action",
            ],
        ),
    ];
    for (what, text, needles) in &cases {
        std::fs::write(&file, text).unwrap();
        eventually(&format!("the {what} edit is refused"), WAIT, async || {
            let p = s.get("/v1/policy").await;
            let errors = strings(&p["last_rejection"]["errors"]);
            needles.iter().all(|n| errors.contains(n))
        })
        .await;
        let p = s.get("/v1/policy").await;
        assert_eq!(
            p["version"],
            v1.as_str(),
            "{what}: the active policy is unchanged"
        );
        // The audit trail has the rejection, with the errors and the submitted text.
        let h = s.get("/v1/policy/history?limit=1").await;
        let rec = &h["records"][0];
        assert_eq!(rec["accepted"], false, "{what}: {rec}");
        assert_eq!(rec["source"], "file");
        assert!(
            strings(&rec["errors"]).contains(needles[0]),
            "{what}: {rec}"
        );
        assert!(
            s.commander.logged("policy change rejected"),
            "{what}: logged"
        );
    }
    // The last broken edit stays on disk; the policy in force is still v1.

    // HTTP: no token, a wrong token, a bad policy: refused; the good one is accepted.
    let raised = good.replace("50.0", "75.0");
    assert_eq!(s.put(&raised, None).await.0, 401);
    assert_eq!(s.put(&raised, Some("guess")).await.0, 401);
    // Audited: who claimed to push, from where, and why it was refused (one record a
    // minute per peer; every attempt is counted).
    let h = s.get("/v1/policy/history?limit=1").await;
    let rec = &h["records"][0];
    assert_eq!(rec["accepted"], false, "{rec}");
    assert_eq!(rec["source"], "http", "{rec}");
    assert_eq!(rec["identity"], "alice@compliance", "{rec}");
    assert_eq!(rec["remote"], "127.0.0.1", "{rec}");
    assert!(strings(&rec["errors"]).contains("token"), "{rec}");
    let unauthorised = reqwest::get(s.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        unauthorised.contains("fleet_policy_unauthorised_total 2"),
        "both attempts counted"
    );
    let (status, body) = s.put(&good.replace("search-daily", ""), Some(TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["accepted"], false);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("pushed.policy.toml:3:"),
        "{body}"
    );
    assert_eq!(s.version().await, v1, "refused pushes change nothing");
    let (status, body) = s.put(&raised, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let v2 = body["version"].as_str().unwrap().to_string();
    assert_ne!(v2, v1);
    assert_eq!(s.version().await, v2);
    let rec = s.get(&format!("/v1/policy/history/{v2}")).await;
    assert_eq!(rec["accepted"], true);
    assert_eq!(rec["source"], "http");
    assert_eq!(rec["identity"], "alice@compliance");
    assert_eq!(rec["previous"], v1.as_str());
    assert_eq!(rec["sha256"].as_str().unwrap().len(), 64);
    assert!(
        rec["diff"]
            .to_string()
            .contains("budget search-daily changed")
            && rec["diff"].to_string().contains("$75.00/day"),
        "{rec}"
    );
    assert!(
        rec["documents"][0]["text"]
            .as_str()
            .unwrap()
            .contains("75.0")
    );

    // The CLI, as a compliance team runs it: a refusal says why in words, a refused
    // policy's problems one per line with file and line, exit 1; the version on stdout.
    let cli_dir = s.dir.path().join("cli");
    std::fs::create_dir_all(&cli_dir).unwrap();
    let bad = cli_dir.join("bad.policy.toml");
    std::fs::write(
        &bad,
        format!(
            "{}\n[[budget]]\nname = \"p\"\nscope = \"pool\"\nmatch = \"gamma\"\nwindow = \"day\"\nlimit_usd = 1.0\naction = \"defer\"\n",
            good.replace("50.0", "-1.0")
        ),
    )
    .unwrap();
    let fine = cli_dir.join("fine.policy.toml");
    std::fs::write(&fine, good.replace("50.0", "80.0")).unwrap();
    let cli = |file: &Path, token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_commander"));
        cmd.args(["policy", "push", "--api", s.commander.http()])
            .args(["--identity", "carol@compliance"])
            .arg(file)
            .env_remove("FLEET_COMPLIANCE_TOKEN");
        if let Some(t) = token {
            cmd.env("FLEET_COMPLIANCE_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, _, err) = cli(&fine, None);
    assert!(
        !ok && err.contains("refused (401): unauthorized: missing compliance token"),
        "{err}"
    );
    let (ok, _, err) = cli(&bad, Some(TOKEN));
    assert!(!ok, "{err}");
    // Each file is named as it was given.
    let at = |line: u32| format!("\n  - {}:{line}: budget ", bad.display());
    assert!(
        err.contains("refused (422): policy rejected: 2 problem(s):")
            && err.contains(&format!("{}search-daily: limit_usd -1", at(7)))
            && err.contains(&format!("{}p: unknown pool \"gamma\"", at(13))),
        "{err}"
    );
    assert_eq!(s.version().await, v2, "a refused push changes nothing");
    let (ok, out, err) = cli(&fine, Some(TOKEN));
    assert!(ok, "{err}");
    let by_cli = out
        .trim()
        .strip_prefix("accepted as ")
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert_eq!(s.version().await, by_cli);
    let rec = s.get(&format!("/v1/policy/history/{by_cli}")).await;
    assert_eq!(rec["identity"], "carol@compliance", "{rec}");
    assert_eq!(rec["previous"], v2.as_str(), "{rec}");

    // NATS: request/reply on fleet.policy.push.
    let push = async |text: &str, token: &str| -> Value {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Authorization", format!("Bearer {token}").as_str());
        h.insert("Fleet-Identity", "bob@compliance");
        let reply = s
            .client
            .request_with_headers("fleet.policy.push", h, text.to_string().into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    };
    let refused = push(
        "[[throttle]]\nname = \"t\"\nscope = \"pool\"\nmatch = \"alpha\"\n",
        TOKEN,
    )
    .await;
    assert_eq!(refused["accepted"], false, "{refused}");
    assert!(
        refused["errors"][0]
            .as_str()
            .unwrap()
            .contains("pushed.policy.toml:1:"),
        "{refused}"
    );
    let wrong = push(&raised, "nope").await;
    assert_eq!(wrong["accepted"], false);
    let throttle = format!(
        "{raised}\n[[throttle]]\nname = \"t\"\nscope = \"pool\"\nmatch = \"alpha\"\ntasks_per_s = 1000\n"
    );
    let ok = push(&throttle, TOKEN).await;
    assert_eq!(ok["accepted"], true, "{ok}");
    let v3 = ok["version"].as_str().unwrap().to_string();
    assert_eq!(s.version().await, v3);
    let h = s.get("/v1/policy/history?limit=50").await;
    let sources: Vec<&str> = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert!(
        sources.contains(&"nats") && sources.contains(&"http") && sources.contains(&"file"),
        "{sources:?}"
    );

    // Decisions made now carry the version in force.
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    producer
        .submit(&summary_task("after-push", 5), SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result("after-push", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok);
    let d = s.get("/v1/decisions/after-push").await;
    assert_eq!(d["policy_version"], v3.as_str(), "{d}");
}

/// GCRA's bound on the sorted pass times `at` of a throttle at `rate` with `burst`: over
/// any span of T at most `burst + rate × T` (+ `slack`), and no faster than the rate in all.
fn assert_within_rate(
    at: &[u64],
    (rate, burst, slack): (f64, f64, f64),
    windows: &[u64],
    what: &str,
) {
    for &window_ms in windows {
        let bound = burst + rate * window_ms as f64 / 1000.0 + slack;
        let worst = most_within(at, window_ms);
        assert!(
            worst as f64 <= bound,
            "{worst} tasks passed within {window_ms} ms{what}; the throttle allows {bound}"
        );
    }
    let n = at.len();
    let span_s = (at[n - 1] - at[0]) as f64 / 1000.0;
    assert!(
        span_s >= (n as f64 - burst) / rate - 0.5,
        "{n} tasks took only {span_s:.2}s{what} at {rate}/s"
    );
}

/// The most of the sorted times `at` within any span of `window_ms`.
fn most_within(at: &[u64], window_ms: u64) -> usize {
    let mut worst = 0;
    let mut lo = 0;
    for hi in 0..at.len() {
        while at[hi] - at[lo] > window_ms {
            lo += 1;
        }
        worst = worst.max(hi - lo + 1);
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_pool_never_exceeds_its_rate() {
    const RATE: f64 = 20.0;
    const BURST: f64 = 2.0;
    const TASKS: usize = 120;
    let policy = format!(
        "[[throttle]]\nname = \"alpha-rate\"\nscope = \"pool\"\nmatch = \"alpha\"\ntasks_per_s = {RATE}\nburst = {BURST}\n"
    );
    let s = PolicyStack::start(&policy, "").await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let ids = || (0..TASKS).map(|i| format!("thr-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    await_ok(&producer, ids(), "nothing throttled is lost").await;
    assert_eq!(seen.lock().unwrap().runs.len(), TASKS);
    assert!(seen.lock().unwrap().runs.values().all(|n| *n == 1));

    // When the throttle let each task through.
    let at = dispatch_times(&s, ids()).await;
    // +1 for the millisecond clock the decisions are stamped with.
    assert_within_rate(&at, (RATE, BURST, 1.0), &[500, 1_000, 2_000], "");
    let throttled = s.get("/v1/policy").await["counters"]["throttled"]
        .as_u64()
        .unwrap();
    assert!(throttled > 0, "the throttle held tasks back");
}

/// A throttle holds for the fleet (docs/policy.md, "Throttles"): with two replicas sharing
/// the intake, each lets through its half of the rate. Before, each let through the whole
/// rate, and the fleet passed twice the throttle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttle_holds_across_replicas() {
    const RATE: f64 = 10.0;
    const BURST: f64 = 2.0;
    const TASKS: usize = 60;
    let policy = format!(
        "[[throttle]]\nname = \"alpha-rate\"\nscope = \"pool\"\nmatch = \"alpha\"\ntasks_per_s = {RATE}\nburst = {BURST}\n"
    );
    let s = PolicyStack::start(&policy, "").await;
    let (b, bases) = replica_b(&s).await;
    let replicas = [
        replica_of(&s.commander.log_text()),
        replica_of(&b.log_text()),
    ];
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let ids = || (0..TASKS).map(|i| format!("fleet-thr-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    await_ok(&producer, ids(), "nothing throttled is lost").await;

    // When each task was let through, by whichever replica decided it (any replica shows
    // a task's latest decision, and which replica made it).
    let mut at = Vec::new();
    let mut by_replica = [0usize; 2];
    for id in ids() {
        let d = get_json_at(&bases[0], &format!("/v1/decisions/{id}")).await;
        assert_eq!(d["outcome"], "dispatched", "{id}: {d}");
        let i = replicas
            .iter()
            .position(|r| d["replica"] == r.as_str())
            .unwrap_or_else(|| panic!("{id}: decided by neither replica: {d}"));
        by_replica[i] += 1;
        at.push(d["at_ms"].as_u64().unwrap());
    }
    at.sort_unstable();
    assert!(
        by_replica.iter().all(|n| *n > 0),
        "both decided: {by_replica:?}"
    );
    // Together (+1 per replica for the millisecond stamps).
    assert_within_rate(
        &at,
        (RATE, BURST, 2.0),
        &[1_000, 2_000, 4_000],
        " on two replicas",
    );
}

/// A burst across replicas stays within a budget (docs/policy.md, "Replicas"): 400 tasks
/// submitted at once to two replicas, room for 100. Each replica admits at most its part
/// of the room it sees until the other has seen its spending, so together they pass the
/// limit by at most one task. With the spending shared but each replica free to take all
/// the room it saw, 160 and 182 ran in two tries: each took most of an intake batch before
/// the other's spending reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_across_replicas_stays_within_a_budget() {
    const FIT: usize = 100;
    const TASKS: usize = 400;
    let s = PolicyStack::start("", "").await;
    let seen = SeenLog::default();
    let _w1 = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let _w2 = quiet_worker(&s.client, "alpha", "a2", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let (_b, _) = two_replicas_with_room(&s, &producer, FIT as f64 + 0.5, "").await;

    let ids = || (0..TASKS).map(|i| format!("burst-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    let mut ran = 0;
    for id in ids() {
        let r = producer.await_result(&id, WAIT).await.unwrap();
        match r.status {
            ResultStatus::Ok => ran += 1,
            ResultStatus::Rejected => {
                let e = r.error.unwrap();
                assert_eq!(e.code, "budget_exceeded", "{id}: {}", e.message);
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(
        (FIT..=FIT + 1).contains(&ran),
        "{ran} of {TASKS} ran with room for {FIT} on two replicas"
    );
}

/// A second replica b beside `s`'s, once each counts two replicas; b and both API bases.
async fn replica_b(s: &PolicyStack) -> (Commander, [String; 2]) {
    let b = PolicyStack::spawn(&s.nats, &s.dir.path().join("replica-b"), &s.config);
    let bases = [s.commander.http().to_string(), b.http().to_string()];
    eventually("each replica counts two", WAIT, async || {
        for base in &bases {
            if get_json_at(base, "/v1/policy").await["replicas"] != 2 {
                return false;
            }
        }
        true
    })
    .await;
    (b, bases)
}

/// Submits a summary task and waits for it to run.
async fn run_one(producer: &Producer, id: &str) {
    producer
        .submit(&summary_task(id, 5), SubmitOptions::default())
        .await
        .unwrap();
    let r = producer.await_result(id, WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok, "{id}");
}

/// A second replica b beside `s`'s, and a fleet budget (`more`: its further lines) with
/// room for `room` summary tasks, as replica a estimates one from a probe run before any
/// budget: in force on both, each counting two replicas. Gives b and both API bases.
async fn two_replicas_with_room(
    s: &PolicyStack,
    producer: &Producer,
    room: f64,
    more: &str,
) -> (Commander, [String; 2]) {
    producer
        .submit(&summary_task("probe", 5), SubmitOptions::default())
        .await
        .unwrap();
    producer.await_result("probe", WAIT).await.unwrap();
    let est = s.get("/v1/decisions/probe").await["est_cost_usd"]
        .as_f64()
        .unwrap();
    let b = PolicyStack::spawn(&s.nats, &s.dir.path().join("replica-b"), &s.config);
    let limit = est * room;
    s.write_policy(&format!(
        "[[budget]]\nname = \"fleet-day\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = {limit}\naction = \"reject\"\n{more}"
    ))
    .await;
    let bases = [s.commander.http().to_string(), b.http().to_string()];
    eventually(
        "each has the budget and counts two replicas",
        WAIT,
        async || {
            for base in &bases {
                let p = get_json_at(base, "/v1/policy").await;
                if !(p["budgets"].as_array().is_some_and(|x| !x.is_empty()) && p["replicas"] == 2) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    (b, bases)
}

/// A release pass and intake batches of more than 5,000 tasks go through. Every publish
/// awaiting its PubAck holds one of its JetStream context's permits until it is awaited;
/// the release loop published a whole pass, and each intake batch all its dispatches,
/// before awaiting any, on a context with async-nats' default of 5,000. With
/// `policy.release_batch = 6000` the pass waited for ever for a 5,001st permit, and every
/// intake batch with it: the whole task path stopped, 3,459 of the 6,000 released tasks
/// dispatched and the rest never (so could `intake.batch_size` past 1,250, the four
/// batches in flight together).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_passes_and_intake_batches_past_five_thousand_tasks_go_through() {
    const TASKS: usize = 6_000;
    let policy = |limit: &str| {
        format!(
            "[[budget]]\nname = \"search-all\"\nscope = \"team\"\nmatch = \"search\"\nwindow = \"day\"\nlimit_usd = {limit}\naction = \"defer\"\n"
        )
    };
    let big = "release_batch = 6000\n[intake]\nbatch_size = 10000\n";
    let s = PolicyStack::start(&policy("0.000000001"), big).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    // In chunks: a producer's submissions awaiting their acks have the same bound.
    let ids: Vec<String> = (0..TASKS).map(|i| format!("big-{i}")).collect();
    for chunk in ids.chunks(2_000) {
        submit_all(&producer, chunk.iter().map(|id| summary_task(id, 5))).await;
    }
    eventually("every task deferred", WAIT, async || {
        s.get("/v1/tasks?state=deferred&limit=1").await["total"] == TASKS as u64
            && stream_messages(&s.client, "FLEET_INTAKE").await == 0
    })
    .await;
    // One pass releases them all; no worker runs, so the work stream keeps each dispatch.
    s.write_policy(&policy("1000")).await;
    eventually("every task released and dispatched", WAIT, async || {
        s.get("/v1/tasks?state=deferred&limit=1").await["total"] == 0
            && stream_messages(&s.client, "FLEET_WORK").await == TASKS as u64
    })
    .await;
}

/// A budget's soft-threshold notice goes out once for the fleet (docs/policy.md, "In order,
/// for each routed task"): each replica decides its own tasks, and each used to send the
/// notice when it first decided one past the threshold; and once more after a restart,
/// which forgot what it had sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_notice_goes_out_once_for_the_fleet_and_not_again_after_a_restart() {
    let mut s = PolicyStack::start("", "").await;
    let seen = SeenLog::default();
    let _w1 = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    // Room for 40 such tasks; a notice at half of it.
    let soft = "soft = [{ at = 0.5, action = \"alert\" }]\n";
    let (mut b, bases) = two_replicas_with_room(&s, &producer, 40.5, soft).await;
    let mut warnings = s.client.subscribe("fleet.alerts.warning").await.unwrap();
    s.client.flush().await.unwrap();
    let notices = async |sub: &mut async_nats::Subscriber| {
        let mut got = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, futures::StreamExt::next(sub)).await
        {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["alert"] == "budget_soft_threshold" {
                got.push(v);
            }
        }
        got
    };

    // One at a time until both replicas have decided tasks past half the room: each may
    // be the one to see the threshold crossed.
    // Any replica shows a task's decision, and which replica made it.
    let decided_by = async |id: &str| {
        let d = get_json_at(&bases[0], &format!("/v1/decisions/{id}")).await;
        d["replica"]
            .as_str()
            .unwrap_or_else(|| panic!("no replica decided {id}: {d}"))
            .to_string()
    };
    let mut deciders = HashSet::new();
    let mut spent = 0;
    while deciders.len() < 2 {
        assert!(
            spent < 32,
            "both replicas decide some of the tasks: {deciders:?}"
        );
        let id = format!("spend-{spent}");
        run_one(&producer, &id).await;
        // From the 22nd task on, the fleet is past half of the room.
        if spent >= 21 {
            deciders.insert(decided_by(&id).await);
        }
        spent += 1;
    }
    let sent = notices(&mut warnings).await;
    assert_eq!(sent.len(), 1, "one notice for the fleet: {sent:?}");
    assert_eq!(sent[0]["budget"], "fleet-day");
    assert_eq!(sent[0]["threshold"], 0.5);
    let id = sent[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("soft."), "{id}");

    // Both restart: what was sent is not sent again in the same window.
    s.commander.kill9();
    b.kill9();
    s.commander = PolicyStack::spawn(&s.nats, s.dir.path(), &s.config);
    b = PolicyStack::spawn(&s.nats, &s.dir.path().join("replica-b"), &s.config);
    for i in 0..2 {
        run_one(&producer, &format!("after-restart-{i}")).await;
    }
    let again = notices(&mut warnings).await;
    assert!(again.is_empty(), "not again after a restart: {again:?}");
    drop(b);
}

/// A replica that stops cleanly is counted out by the others at once (docs/policy.md,
/// "Replicas"): each throttle's part and the budget parts go back to them, and its
/// reservations stop counting. Before, they counted it for 30 s more, the time given to a
/// replica that went silent, and let through half of each throttle's rate meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_cleanly_is_counted_out_at_once() {
    let s = PolicyStack::start("", "").await;
    let mut b = PolicyStack::spawn(&s.nats, &s.dir.path().join("replica-b"), &s.config);
    let a = s.commander.http().to_string();
    let replicas = async || get_json_at(&a, "/v1/policy").await["replicas"].clone();
    eventually("a counts two replicas", WAIT, async || {
        replicas().await == 2
    })
    .await;
    assert_eq!(
        b.terminate(Duration::from_secs(30)),
        Some(0),
        "b stops cleanly"
    );
    // Well within the 30 s a silent replica is given.
    eventually(
        "a counts itself alone",
        Duration::from_secs(10),
        async || replicas().await == 1,
    )
    .await;
    assert_eq!(metric_at(&a, "fleet_replicas").await, 1.0);
}

/// A replica that stops cleanly while others run hands the tasks waiting in its store
/// (deferred by a budget, parked by a throttle) to them through the intake stream
/// (docs/policy.md, "Replicas"). A replica scaled down for good, or replaced by one with a
/// fresh store, used to keep them where nobody would ever release them. The budget's
/// queue keeps their places; the replica, back, answers for them with the record of the
/// one that keeps them now and carries an operator's cancel there (it used to say
/// `deferred` from its own record and refuse the cancel, 409, for as long as they ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_hands_its_waiting_tasks_to_the_others() {
    // Every `search` task is over the limit; the `slow` team gets a turn per 100 s.
    let policy = |limit: &str, rate: &str| {
        format!(
            "[[budget]]\nname = \"search-tiny\"\nscope = \"team\"\nmatch = \"search\"\nwindow = \"day\"\nlimit_usd = {limit}\naction = \"defer\"\n\n[[throttle]]\nname = \"slow-team\"\nscope = \"team\"\nmatch = \"slow\"\ntasks_per_s = {rate}\n"
        )
    };
    let mut s = PolicyStack::start(&policy("0.000000001", "0.01"), "").await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let task = |id: &str, team: &str| {
        let mut t = summary_task(id, 5);
        t.attributes.insert("team".into(), team.into());
        t
    };
    // slow-0 takes the throttle's burst; the others wait on replica a, alone so far.
    submit_all(&producer, [task("slow-0", "slow")]).await;
    await_ok(&producer, ["slow-0".to_string()], "the throttle's burst").await;
    let search = || (0..4).map(|i| format!("search-{i}"));
    let slow = || (1..3).map(|i| format!("slow-{i}"));
    let waiting = search()
        .map(|id| task(&id, "search"))
        .chain(slow().map(|id| task(&id, "slow")));
    submit_all(&producer, waiting).await;
    eventually("a holds four deferred and two parked", WAIT, async || {
        s.get("/v1/tasks?state=deferred").await["total"] == 4
            && s.parked().await == 2.0
            && stream_messages(&s.client, "FLEET_INTAKE").await == 0
    })
    .await;
    let places = |listed: &Value| -> Vec<(String, u64)> {
        listed["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let at = t["deferred_at"].as_str().unwrap();
                let at = fleet_worker::message::rfc3339_unix_ms(at).unwrap();
                (t["task_id"].as_str().unwrap().to_string(), at)
            })
            .collect()
    };
    let on_a = places(&s.get("/v1/tasks?state=deferred").await);
    // The listing shows deferral times to the second: a deferral made afresh on b, and
    // not at the place the task had, would show a later one.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (b, bases) = replica_b(&s).await;
    // Either replica lists the fleet's queue: b shows what waits on a.
    let b_base = &bases[1];
    eventually("b lists a's queue", WAIT, async || {
        let listed = get_json_at(b_base, "/v1/tasks?state=deferred").await;
        listed["replicas"] == 2 && places(&listed) == on_a
    })
    .await;
    assert_eq!(
        s.commander.terminate(Duration::from_secs(30)),
        Some(0),
        "a stops cleanly"
    );
    // b's limiters are new since it counts itself alone: one of the two parked tasks
    // takes the burst there.
    let slow_ran = || {
        let runs = seen.lock().unwrap();
        slow()
            .filter(|id| runs.runs.keys().any(|(ran, _)| ran == id))
            .count()
    };
    eventually("b holds what a held", WAIT, async || {
        get_json_at(b_base, "/v1/tasks?state=deferred").await["total"] == 4
            && metric_at(b_base, "fleet_parked_tasks").await + slow_ran() as f64 == 2.0
    })
    .await;
    let on_b = places(&get_json_at(b_base, "/v1/tasks?state=deferred").await);
    assert_eq!(on_b, on_a, "the budget's queue keeps their places");

    // a is back: it answers for them with b's record, and cancels through b.
    s.commander = PolicyStack::spawn(&s.nats, s.dir.path(), &s.config);
    let a_base = s.commander.http().to_string();
    let b_replica = task_record(b_base, "search-3").await.unwrap()["replica"].clone();
    let rec = task_record(&a_base, "search-3").await.unwrap();
    assert_eq!(rec["replica"], b_replica, "{rec}");
    assert_eq!(rec["state"], "deferred", "{rec}");
    let resp = reqwest::Client::new()
        .post(format!("{a_base}/v1/control"))
        .json(&serde_json::json!({"command": "cancel", "task_id": "search-3", "reason": "the customer left"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ack: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{ack}");
    let r = producer.await_result("search-3", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Cancelled, "{r:?}");

    // Room again: the rest run, each once.
    s.write_policy(&policy("1000", "100")).await;
    let rest: Vec<String> = search().take(3).chain(slow()).collect();
    await_ok(
        &producer,
        rest.clone(),
        "handed to b, run once there is room",
    )
    .await;
    let runs = seen.lock().unwrap().runs.clone();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    // Each record on a, where they were deferred, tells how they ended.
    for id in &rest {
        eventually("a's record ends", WAIT, async || {
            task_record(&a_base, id).await.unwrap()["state"] == "completed"
        })
        .await;
    }
    drop(b);
}

/// A throttle's backlog waits parked, out of the intake stream: another team's tasks
/// pass it at once, instead of queueing behind the whole backlog (with the intake window
/// of 16 here, behind 44 of the 60 throttled tasks, 11 s at 4 tasks/s). Parked tasks keep
/// their turns across a kill -9, and every one runs once, at the throttle's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttled_team_s_backlog_does_not_hold_up_other_teams_or_get_lost() {
    const NOISY: usize = 60;
    const QUIET: usize = 5;
    const RATE: f64 = 4.0;
    let policy = format!(
        "[[throttle]]\nname = \"noisy-team\"\nscope = \"team\"\nmatch = \"noisy\"\ntasks_per_s = {RATE}\n"
    );
    // A window of 16 (8 × the batch): the old throttle held the backlog inside it.
    let mut s = PolicyStack::start(&policy, "[intake]\nbatch_size = 2\n").await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let task = |id: String, team: &str| {
        let mut t = summary_task(&id, 5);
        t.attributes.insert("team".into(), team.into());
        t
    };
    let noisy = || (0..NOISY).map(|i| format!("noisy-{i}"));
    let quiet = || (0..QUIET).map(|i| format!("quiet-{i}"));
    let tasks = noisy()
        .map(|id| task(id, "noisy"))
        .chain(quiet().map(|id| task(id, "quiet")));
    submit_all(&producer, tasks).await;
    await_ok(&producer, quiet(), "the quiet team's task ran").await;
    let noisy_run = |seen: &SeenLog| {
        let seen = seen.lock().unwrap();
        seen.runs
            .keys()
            .filter(|(id, _)| id.starts_with("noisy-"))
            .count()
    };
    let ran = noisy_run(&seen);
    assert!(
        ran < 30,
        "the quiet team's tasks waited for {ran} of the noisy team's {NOISY}"
    );
    // The backlog is parked, and says so to whoever looks the task up.
    let last = task_record(s.commander.http(), &format!("noisy-{}", NOISY - 1))
        .await
        .unwrap();
    assert_eq!(last["state"], "deferred", "{last}");
    assert_eq!(last["deferred"]["turn"]["throttle"], "noisy-team", "{last}");
    assert!(
        last["deferred"]["reason"].as_str().unwrap().contains(
            "throttle `noisy-team` (4 task(s)/s for `noisy`) holds it back: its turn is at"
        ),
        "{last}"
    );
    eventually("tasks parked", WAIT, async || s.parked().await > 10.0).await;
    // Listed in turn order, each with its turn.
    let listed = s.get("/v1/tasks?state=parked&limit=1000").await;
    let turns: Vec<u64> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["turn"]["at_ms"].as_u64().unwrap())
        .collect();
    assert!(turns.len() > 10 && turns.is_sorted(), "{listed}");

    // kill -9 with most of the backlog parked: every task still runs, once.
    s.commander.kill9();
    s.commander = PolicyStack::spawn(&s.nats, s.dir.path(), &s.config);
    await_ok(&producer, noisy(), "nothing parked is lost").await;
    let seen_now = seen.lock().unwrap().runs.clone();
    assert_eq!(seen_now.len(), NOISY + QUIET);
    assert!(seen_now.values().all(|n| *n == 1), "{seen_now:?}");
    // At the throttle's rate: 60 tasks at 4/s take at least about 14.75 s.
    let at = dispatch_times(&s, noisy()).await;
    let span_s = (at[NOISY - 1] - at[0]) as f64 / 1000.0;
    assert!(
        span_s >= (NOISY as f64 - 1.0) / RATE - 1.0,
        "{NOISY} tasks passed in {span_s:.2}s at {RATE}/s"
    );
    assert_eq!(s.parked().await, 0.0);
}

/// Raising a throttle frees its parked backlog at once: the turns the old rate gave
/// (here up to 200 s off, longer than the test waits) are void under the new spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raising_a_throttle_releases_its_parked_tasks_at_once() {
    const TASKS: usize = 20;
    let throttle = |rate: f64| {
        format!(
            "[[throttle]]\nname = \"search-team\"\nscope = \"team\"\nmatch = \"search\"\ntasks_per_s = {rate}\n"
        )
    };
    let s = PolicyStack::start(&throttle(0.1), "").await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let ids = || (0..TASKS).map(|i| format!("slow-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    eventually("the backlog parked", WAIT, async || {
        s.parked().await >= (TASKS - 11) as f64
    })
    .await;
    s.write_policy(&throttle(1000.0)).await;
    // All of them within the wait, not one wait each: the last old turn is 190 s off.
    eventually("the backlog ran", WAIT, async || {
        seen.lock().unwrap().runs.len() == TASKS
    })
    .await;
    await_ok(&producer, ids(), "released by the raise").await;
    assert_eq!(seen.lock().unwrap().runs.len(), TASKS);
    assert_eq!(s.parked().await, 0.0);
}

/// In a simulation lab (`[clock] speed`), a throttle's rate is in fleet time, as every
/// other window and rate is: at 50× one task per 50 s of fleet time passes once a second.
/// Before, its limiter ran on the wall clock while its turns were in fleet time: 50 times
/// too slow (this test's backlog would take 200 s), and each parked task came back at its
/// turn only to be held back again, some 50 times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_throttle_in_a_lab_runs_at_its_rate_in_fleet_time() {
    const SPEED: f64 = 50.0;
    const RATE: f64 = 0.02;
    const BURST: usize = 2;
    const TASKS: usize = 6;
    let policy = format!(
        "[[throttle]]\nname = \"alpha-rate\"\nscope = \"pool\"\nmatch = \"alpha\"\ntasks_per_s = {RATE}\nburst = {BURST}\n"
    );
    let s = PolicyStack::start(&policy, &format!("[clock]\nspeed = {SPEED}\n")).await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let ids = || (0..TASKS).map(|i| format!("lab-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    await_ok(&producer, ids(), "the backlog runs at the fleet-time rate").await;
    assert!(seen.lock().unwrap().runs.values().all(|n| *n == 1));
    // Not faster than the rate either: one task per 50 s of fleet time after the burst
    // is 1 s of wall time each (the decisions are stamped on the wall clock).
    let at = dispatch_times(&s, ids()).await;
    let span_s = (at[TASKS - 1] - at[0]) as f64 / 1000.0;
    let allowed_s = (TASKS - BURST) as f64 / RATE / SPEED;
    assert!(
        span_s >= allowed_s - 0.5,
        "{TASKS} tasks passed in {span_s:.2} s of wall time; {RATE}/s of fleet time allows {allowed_s} s"
    );
    // Each held-back task was held back about once: at its turn it found its permit.
    let throttled = s.get("/v1/policy").await["counters"]["throttled"]
        .as_u64()
        .unwrap();
    let held = (TASKS - BURST) as u64;
    assert!(
        (held..=2 * held).contains(&throttled),
        "{held} tasks waited for their turns, and were held back {throttled} times"
    );
}

/// Parked tasks go back at their turns however long `policy.release_interval_ms` is (it
/// paces the budget checks, not the turns). Before, the release loop slept that long
/// once nothing was parked, and a task parked meanwhile waited for it: here ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_tasks_go_at_their_turns_whatever_the_release_interval() {
    const TASKS: usize = 15;
    let throttle = "[[throttle]]\nname = \"alpha-rate\"\nscope = \"pool\"\nmatch = \"alpha\"\ntasks_per_s = 5\n";
    let s = PolicyStack::start_released_every(600_000, "", |policies| {
        std::fs::write(policies.join("main.policy.toml"), throttle).unwrap()
    })
    .await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let ids = || (0..TASKS).map(|i| format!("turn-{i}"));
    submit_all(&producer, ids().map(|id| summary_task(&id, 5))).await;
    await_ok(&producer, ids(), "back at its turn, not at the interval").await;
    assert_eq!(seen.lock().unwrap().runs.len(), TASKS);
    // Some were parked (their turns were over a second off), not waited out in the
    // stream. Which ones depends on the order concurrent intake batches read them, not
    // on the order they were sent.
    let mut parked = Vec::new();
    for id in ids() {
        let rec = task_record(s.commander.http(), &id).await.unwrap();
        let states: Vec<String> = rec["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap().to_string())
            .collect();
        if states.iter().any(|st| st == "deferred") {
            parked.push(id);
        }
    }
    assert!(!parked.is_empty(), "no task was parked");
    assert_eq!(s.parked().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budgets_defer_at_the_limit_survive_a_kill_and_release_when_raised() {
    let mut s = PolicyStack::start("", "").await;
    let seen = SeenLog::default();
    let _worker = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());

    // One probe tells what such a task is estimated at.
    producer
        .submit(&summary_task("probe", 5), SubmitOptions::default())
        .await
        .unwrap();
    producer.await_result("probe", WAIT).await.unwrap();
    let est = s.get("/v1/decisions/probe").await["est_cost_usd"]
        .as_f64()
        .unwrap();
    assert!(est > 0.0);

    // The probe ran before the budget existed, so it is not counted: room for ten and a
    // half tasks means exactly ten of thirty fit.
    let limit = est * 10.5;
    let budget = |limit: f64| {
        format!(
            "[[budget]]\nname = \"search-daily\"\nscope = \"team\"\nmatch = \"search\"\nwindow = \"day\"\nlimit_usd = {limit}\naction = \"defer\"\n"
        )
    };
    let v_tight = s.write_policy(&budget(limit)).await;
    // Priorities 0-9 three times over, submitted all at once.
    let edge = (0..30).map(|i| summary_task(&format!("edge-{i}"), (i % 10) as u8));
    submit_all(&producer, edge).await;
    eventually("30 tasks decided", WAIT, async || {
        let p = s.get("/v1/policy").await;
        let deferred = s.get("/v1/tasks?state=deferred").await["total"]
            .as_u64()
            .unwrap();
        deferred == 20 && p["standing"][0]["reserved_usd"].as_f64().unwrap() < 1e-12
    })
    .await;
    let p = s.get("/v1/policy").await;
    let st = &p["standing"][0];
    let committed = st["spent_usd"].as_f64().unwrap() + st["reserved_usd"].as_f64().unwrap();
    assert!(
        committed <= limit + 1e-9,
        "committed {committed} over limit {limit}"
    );
    assert!(
        (committed - 10.0 * est).abs() < 1e-9,
        "ten tasks charged: {committed} vs {}",
        10.0 * est
    );
    assert_eq!(
        seen.lock().unwrap().runs.len(),
        11,
        "probe + ten dispatched"
    );
    let listed = s.get("/v1/tasks?state=deferred&limit=100").await;
    let first = &listed["tasks"][0];
    assert_eq!(first["priority"], 9, "released priority first: {listed}");
    let first_id = first["task_id"].as_str().unwrap().to_string();
    let one = task_record(s.commander.http(), &first_id).await.unwrap();
    assert_eq!(one["state"], "deferred");
    assert!(
        one["deferred"]["reason"]
            .as_str()
            .unwrap()
            .contains("deferred until"),
        "{one}"
    );
    assert!(
        one["deferred"]["until"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z"),
        "{one}"
    );
    assert_eq!(one["policy_version"], v_tight.as_str());
    assert_eq!(one["deferred"]["releases"], 0, "not released yet: {one}");

    // kill -9: the deferred queue and the ledger come back from the store.
    s.commander.kill9();
    s.commander = PolicyStack::spawn(&s.nats, s.dir.path(), &s.config);
    let listed = s.get("/v1/tasks?state=deferred").await;
    assert_eq!(listed["total"], 20, "no deferred task lost in the crash");
    let st = &s.get("/v1/policy").await["standing"][0];
    assert!(
        (st["spent_usd"].as_f64().unwrap() - 10.0 * est).abs() < 1e-9,
        "ledger survived: {st}"
    );
    assert_eq!(
        s.version().await,
        v_tight,
        "the same version after the restart"
    );

    // Shadow replay: a much smaller budget would have rejected most of the last hour.
    let candidate = s.dir.path().join("candidate.policy.toml");
    std::fs::write(
        &candidate,
        budget(est * 3.5).replace("\"defer\"", "\"reject\""),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_commander"))
        .args([
            "policy",
            "replay",
            "--last",
            "1h",
            "--json",
            "--api",
            s.commander.http(),
        ])
        .arg(&candidate)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["decisions"], 31, "{report}");
    assert_eq!(
        report["rejected"], 28,
        "3 fit, the other 7 dispatched and 20 deferred would be rejected: {report}"
    );
    assert!(report["cost_delta_usd"].as_f64().unwrap() < 0.0, "{report}");
    assert_eq!(
        seen.lock().unwrap().runs.len(),
        11,
        "replay dispatched nothing"
    );

    // The limit rises: every deferred task is released, each runs exactly once.
    let v_loose = s.write_policy(&budget(est * 100.0)).await;
    for i in 0..30 {
        let r = producer
            .await_result(&format!("edge-{i}"), WAIT)
            .await
            .unwrap();
        assert_eq!(r.status, ResultStatus::Ok);
    }
    let runs = seen.lock().unwrap().runs.clone();
    assert_eq!(runs.len(), 31);
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
    assert_eq!(s.get("/v1/tasks?state=deferred").await["total"], 0);
    let released = s.get(&format!("/v1/decisions/{first_id}")).await;
    assert_eq!(released["policy_version"], v_loose.as_str(), "{released}");
    assert_eq!(released["outcome"], "dispatched");
    let rec = task_record(s.commander.http(), &first_id).await.unwrap();
    assert_eq!(rec["state"], "completed", "{rec}");
    assert_eq!(rec["deferred"]["releases"], 1, "left the queue once: {rec}");
}

/// A deadline `secs` from now (negative: past), as a producer writes one.
fn deadline_in(secs: i64) -> String {
    let now = std::time::SystemTime::now();
    let at = if secs >= 0 {
        now + Duration::from_secs(secs.unsigned_abs())
    } else {
        now - Duration::from_secs(secs.unsigned_abs())
    };
    humantime::format_rfc3339_millis(at).to_string()
}

/// A task's `deadline` ends it wherever it waits: one already past at intake is cancelled
/// without a classification or a decision; one a budget deferred (here until the limit is
/// raised, so for good) or a throttle parked (turns 100 s apart) is cancelled at its
/// deadline, across a kill -9, with `deadline_exceeded`; none of them runs. Tasks without
/// a deadline stay where they were, until an operator cancels them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_task_ends_at_its_deadline_or_when_an_operator_cancels_it() {
    // Every `search` task is larger than the whole limit: deferred until it is raised.
    let policy = "[[budget]]\nname = \"search-tiny\"\nscope = \"team\"\nmatch = \"search\"\nwindow = \"day\"\nlimit_usd = 0.000000001\naction = \"defer\"\n\n[[throttle]]\nname = \"slow-team\"\nscope = \"team\"\nmatch = \"slow\"\ntasks_per_s = 0.01\n";
    let mut s = PolicyStack::start(policy, "").await;
    let seen = SeenLog::default();
    let _w = quiet_worker(&s.client, "alpha", "a1", seen.clone()).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let task = |id: &str, team: &str, deadline: Option<String>| {
        let mut t = summary_task(id, 5);
        t.attributes.insert("team".into(), team.into());
        t.deadline = deadline;
        t
    };
    // Already past: ended at intake.
    submit_all(&producer, [task("late", "other", Some(deadline_in(-60)))]).await;
    let r = producer.await_result("late", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Cancelled, "{r:?}");
    assert_eq!(r.error.as_ref().unwrap().code, "deadline_exceeded", "{r:?}");
    let resp = reqwest::get(s.http("/v1/decisions/late")).await.unwrap();
    assert_eq!(resp.status(), 404, "no decision was spent on it");

    // Waiting: deferred by the budget, parked by the throttle. Its burst goes to whichever
    // slow task the intake reads first, and concurrent intake batches need not read them
    // in submission order: slow-0 (without a deadline, so a loaded machine that runs it
    // late does not make it a cancel) is read, and run, before the others are sent.
    let deadline = deadline_in(8);
    submit_all(&producer, [task("slow-0", "slow", None)]).await;
    let r = producer.await_result("slow-0", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok, "slow-0: the throttle's burst");
    let waiting = ["budget-0", "budget-1", "slow-1", "slow-2"];
    submit_all(
        &producer,
        waiting.iter().map(|id| {
            let team = if id.starts_with("budget") {
                "search"
            } else {
                "slow"
            };
            task(id, team, Some(deadline.clone()))
        }),
    )
    .await;
    submit_all(
        &producer,
        [
            task("budget-forever", "search", None),
            task("slow-3", "slow", None),
        ],
    )
    .await;
    // Counted as soon as stored, they are durable once flushed, and then their intake
    // messages are acked: the kill -9 below comes after that. (Before the flush, a kill
    // is a redelivery to a restarted commander that has no line for the team: its burst
    // lets the first task without a deadline through, as it should.)
    eventually(
        "the budget deferred three, the throttle parked three, all acked",
        WAIT,
        async || {
            let d = s.get("/v1/tasks?state=deferred").await["total"].as_u64();
            d == Some(3)
                && s.parked().await == 3.0
                && stream_messages(&s.client, "FLEET_INTAKE").await == 0
        },
    )
    .await;
    let rec = task_record(s.commander.http(), "budget-0").await.unwrap();
    assert_eq!(rec["state"], "deferred", "{rec}");
    let listed = s.get("/v1/tasks?state=deferred").await;
    let deadlines: Vec<_> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap(), t["deadline"].as_str()))
        .collect();
    let at = |t: Option<&str>| t.and_then(fleet_worker::message::rfc3339_unix_ms);
    assert!(
        deadlines.iter().all(|(id, d)| match *id {
            "budget-forever" => d.is_none(),
            _ => at(*d) == at(Some(&deadline)),
        }),
        "{listed}"
    );
    // A kill -9 while they wait: the deadlines are kept with them.
    s.commander.kill9();
    s.commander = PolicyStack::spawn(&s.nats, s.dir.path(), &s.config);
    for id in ["slow-0"] {
        let r = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Ok, "{id}: the throttle's burst");
    }
    for id in ["budget-0", "budget-1", "slow-1", "slow-2"] {
        let r = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Cancelled, "{id}: {r:?}");
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.code, "deadline_exceeded", "{id}: {r:?}");
        assert!(e.message.contains(&deadline), "{id}: {r:?}");
        let finished = r.timings.finished_at.as_deref().unwrap();
        assert!(
            fleet_worker::message::rfc3339_unix_ms(finished)
                >= fleet_worker::message::rfc3339_unix_ms(&deadline),
            "{id} ended at {finished}, before its deadline {deadline}"
        );
        let rec = task_record(s.commander.http(), id).await.unwrap();
        assert_eq!(rec["state"], "failed", "{rec}");
        assert_eq!(rec["outcome"]["status"], "cancelled", "{rec}");
    }
    let runs = seen.lock().unwrap().runs.clone();
    assert_eq!(
        runs.keys().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["slow-0"],
        "nothing past its deadline ran"
    );
    // The tasks without a deadline still wait.
    let listed = s.get("/v1/tasks?state=deferred").await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["tasks"][0]["task_id"], "budget-forever", "{listed}");
    assert_eq!(s.parked().await, 1.0);

    // An operator cancels them: each gets its `cancelled` result with the reason.
    let cancel = async |id: &str| {
        let resp = reqwest::Client::new()
            .post(s.http("/v1/control"))
            .json(&serde_json::json!({"command": "cancel", "task_id": id, "reason": "the customer left"}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    for (id, was) in [("budget-forever", "deferred"), ("slow-3", "parked")] {
        let (status, ack) = cancel(id).await;
        assert_eq!(status, 200, "{ack}");
        assert_eq!(ack["state"]["was"], was, "{ack}");
        let r = producer.await_result(id, WAIT).await.unwrap();
        assert_eq!(r.status, ResultStatus::Cancelled, "{id}: {r:?}");
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.code, "cancelled", "{r:?}");
        assert!(e.message.contains("the customer left"), "{r:?}");
        let rec = task_record(s.commander.http(), id).await.unwrap();
        assert_eq!(rec["state"], "failed", "{rec}");
        assert_eq!(rec["outcome"]["status"], "cancelled", "{rec}");
        let (status, ack) = cancel(id).await;
        assert_eq!(status, 409, "a finished task: {ack}");
    }
    assert_eq!(s.get("/v1/tasks?state=deferred").await["total"], 0);
    assert_eq!(s.parked().await, 0.0);
    assert_eq!(seen.lock().unwrap().runs.len(), 1, "none of them ran");
    // Their places in the throttle's line are free again: a new task of the team waits
    // for the limiter alone (fresh since the restart, so not at all), not behind the
    // turns 100, 200 and 300 s off that nobody will come back for.
    submit_all(&producer, [task("slow-4", "slow", None)]).await;
    let r = producer.await_result("slow-4", WAIT).await.unwrap();
    assert_eq!(r.status, ResultStatus::Ok, "{r:?}");
    let text = s.metrics().await;
    // `late` before the kill is not in the restarted commander's counter.
    assert_eq!(sample_value(&text, "fleet_tasks_expired_total"), 4.0);
    assert_eq!(
        sample_value(&text, "fleet_waiting_tasks_cancelled_total"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_tasks_while_throttles_and_budgets_flip() {
    const CHUNKS: usize = 5;
    const PER_CHUNK: usize = 2_000;
    // Each flip: (throttle tasks/s on both pools or none, fleet budget USD, action).
    let flips: [(Option<u32>, f64); CHUNKS] = [
        (Some(4_000), 1_000.0),
        (None, 0.000_001),
        (Some(1_500), 1_000.0),
        (None, 0.000_001),
        (Some(3_000), 1_000.0),
    ];
    let policy = |(rate, limit): (Option<u32>, f64)| {
        let mut p = format!(
            "[[budget]]\nname = \"fleet-day\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = {limit}\naction = \"defer\"\n"
        );
        if let Some(r) = rate {
            for pool in ["alpha", "beta"] {
                p.push_str(&format!(
                    "\n[[throttle]]\nname = \"{pool}-rate\"\nscope = \"pool\"\nmatch = \"{pool}\"\ntasks_per_s = {r}\nburst = 50\n"
                ));
            }
        }
        p
    };
    let s = PolicyStack::start(&policy((None, 1_000.0)), "").await;
    let seen = SeenLog::default();
    let _workers = two_workers_per_pool(&s.client, 32, Duration::ZERO, &seen).await;
    let producer = Producer::new(s.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();

    let mut versions = Vec::new();
    let mut submitted = HashSet::new();
    for (chunk, flip) in flips.iter().enumerate() {
        // Swap while the previous chunks are still in flight, then prove that a task
        // submitted after the swap is decided under the new version.
        let v = s.write_policy(&policy(*flip)).await;
        let probe = format!("probe-{chunk}");
        let mut t = Task::new("a probe after the swap");
        t.capabilities = vec!["summarise".into()];
        let opts = SubmitOptions {
            idempotency_key: Some(probe.clone()),
            reply_to: Some(inbox.subject().to_string()),
            ..Default::default()
        };
        producer.submit(&t, opts).await.unwrap();
        submitted.insert(probe.clone());
        let mut got = Value::Null;
        eventually("the probe is decided", WAIT, async || {
            let r = reqwest::get(s.http(&format!("/v1/decisions/{probe}")))
                .await
                .unwrap();
            if !r.status().is_success() {
                return false;
            }
            got = r.json().await.unwrap();
            true
        })
        .await;
        assert_eq!(got["policy_version"], v.as_str(), "chunk {chunk}: {got}");
        versions.push(v);

        let mut acks = Vec::new();
        for i in 0..PER_CHUNK {
            let id = format!("flip-{chunk}-{i}");
            let mut t = Task::new(format!("task {i} of chunk {chunk}"));
            t.capabilities = vec![if i % 2 == 0 { "summarise" } else { "code" }.into()];
            let opts = SubmitOptions {
                idempotency_key: Some(id.clone()),
                reply_to: Some(inbox.subject().to_string()),
                ..Default::default()
            };
            submitted.insert(id);
            acks.push(producer.submit_pipelined(&t, opts).await.unwrap());
        }
        for a in acks {
            assert!(!a.await.unwrap().duplicate);
        }
    }
    // The last word: no throttle, room for everything; deferred tasks are released.
    let last = s.write_policy(&policy((None, 1_000.0))).await;
    versions.push(last.clone());

    let total = submitted.len();
    let mut results: HashMap<String, ResultStatus> = HashMap::new();
    while results.len() < total {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .expect("results keep coming")
            .unwrap()
            .unwrap();
        assert!(
            results.insert(r.task_id.clone(), r.status).is_none(),
            "duplicate result"
        );
    }
    assert!(results.values().all(|s| *s == ResultStatus::Ok));
    assert_eq!(
        results.keys().cloned().collect::<HashSet<_>>(),
        submitted,
        "no task lost"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.runs.len(), total, "every task ran");
        assert!(seen.runs.values().all(|n| *n == 1), "no task ran twice");
    }
    assert_eq!(s.get("/v1/tasks?state=deferred").await["total"], 0);

    // The flips did something: tasks were deferred and released, and held back by throttles.
    let p = s.get("/v1/policy").await;
    let c = &p["counters"];
    assert!(c["deferred"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(
        c["released"], c["deferred"],
        "every deferral was released: {c}"
    );
    assert_eq!(p["version"], last.as_str());
    let unique: HashSet<&String> = versions.iter().collect();
    assert_eq!(
        unique.len(),
        versions.len(),
        "each flip was a new version: {versions:?}"
    );
}

/// Publishes `text` as the ConfigMap version `version` of `cm`, as kubelet does: a new
/// versioned directory, `..data` swapped to it in one rename, the file a link through it.
fn publish_configmap(cm: &Path, version: &str, text: &str) {
    std::fs::create_dir(cm.join(version)).unwrap();
    std::fs::write(cm.join(version).join("main.policy.toml"), text).unwrap();
    std::os::unix::fs::symlink(version, cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    let file = cm.join("main.policy.toml");
    if std::fs::symlink_metadata(&file).is_err() {
        std::os::unix::fs::symlink("..data/main.policy.toml", file).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_directory_mounted_from_a_configmap_follows_its_updates() {
    let good = SEARCH_DAILY;
    let s =
        PolicyStack::start_laid_out("rescan_secs = 1", |cm| publish_configmap(cm, "..v1", good))
            .await;
    let limit = async || s.get("/v1/policy").await["budgets"][0]["limit_usd"].as_f64();
    assert_eq!(limit().await, Some(50.0));

    // An update touches only `..data` and the versioned directories; no event names the
    // policy file.
    publish_configmap(&s.policies, "..v2", &good.replace("50.0", "60.0"));
    eventually("the update is in force", WAIT, async || {
        limit().await == Some(60.0)
    })
    .await;
    let in_force = s.version().await;

    // A broken update is refused once, however many rescans read it again.
    publish_configmap(&s.policies, "..v3", "[[budget]\n");
    let refusals = async || {
        let h = s.get("/v1/policy/history?limit=500").await;
        h["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["accepted"] == false && r["source"] == "file")
            .count()
    };
    eventually("the broken update is refused", WAIT, async || {
        refusals().await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        refusals().await,
        1,
        "three rescans later, still one refusal"
    );
    assert_eq!(s.version().await, in_force);

    // A push replaces the directory's policy until the directory changes: the rescans
    // that read the same files do not apply them again.
    let (status, body) = s.put(&good.replace("50.0", "75.0"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(limit().await, Some(75.0), "the push stays in force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_edit_the_policy_bucket_refused_is_applied_at_a_later_rescan() {
    let good = "[[budget]]\nname = \"b\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = 50.0\naction = \"defer\"\n";
    let s = PolicyStack::start(good, "rescan_secs = 1").await;
    let limit = async || s.get("/v1/policy").await["budgets"][0]["limit_usd"].as_f64();
    assert_eq!(limit().await, Some(50.0));
    // The bucket's stream takes nothing more for a while (as when JetStream's storage is
    // full): the write fails at once, and nothing is left to go through later.
    let js = async_nats::jetstream::new(s.client.clone());
    let mut stream = js.get_stream("KV_fleet_policy").await.unwrap();
    let open = stream.info().await.unwrap().config.clone();
    let mut full = open.clone();
    full.max_bytes = stream.info().await.unwrap().state.bytes as i64;
    full.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(&full).await.unwrap();

    let tmp = s.policies.join(".main.tmp");
    std::fs::write(&tmp, good.replace("50.0", "80.0")).unwrap();
    std::fs::rename(&tmp, s.policies.join("main.policy.toml")).unwrap();
    assert!(
        s.commander
            .wait_for_log("policy directory change not confirmed", WAIT),
        "the bucket refused the edit"
    );
    assert_eq!(limit().await, Some(50.0));
    js.update_stream(&open).await.unwrap();
    // No file event comes: a rescan tries the same files again.
    eventually(
        "the edit is in force once the bucket takes it",
        WAIT,
        async || limit().await == Some(80.0),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_converges_on_a_pushed_version() {
    // Two commanders on one NATS, each with its own store: a push to one is in force on
    // both, audited on both, and a restart of the other comes back on it.
    let a = PolicyStack::start("", "").await;
    let mut b = PolicyStack::spawn(&a.nats, &a.dir.path().join("replica-b"), &a.config);
    let b_version = async |b: &Commander| -> String {
        let v: Value = reqwest::get(format!("{}/v1/policy", b.http()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["version"].as_str().unwrap().to_string()
    };
    let v1 = a.version().await;
    eventually("b follows the directory's version", WAIT, async || {
        b_version(&b).await == v1
    })
    .await;
    let (status, body) = a
        .put(
            "[[throttle]]\nname = \"t\"\nscope = \"team\"\ntasks_per_s = 100\n",
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v2 = body["version"].as_str().unwrap().to_string();
    eventually("b applies the push", WAIT, async || {
        b_version(&b).await == v2
    })
    .await;
    let rec: Value = reqwest::get(format!("{}/v1/policy/history/{v2}", b.http()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["source"], "http", "{rec}");
    assert_eq!(rec["identity"], "alice@compliance");
    assert!(strings(&rec["diff"]).contains("throttle t added"), "{rec}");

    // A restart converges on the bucket (the directory did not change, so it stays).
    b.kill9();
    b = PolicyStack::spawn(&a.nats, &a.dir.path().join("replica-b"), &a.config);
    assert_eq!(b_version(&b).await, v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_after_a_nats_server_restart_is_in_force_on_both_replicas() {
    // The policy bucket watch of each replica must come back by itself after a broker crash.
    let mut a = PolicyStack::start("", "").await;
    let b = PolicyStack::spawn(&a.nats, &a.dir.path().join("replica-b"), &a.config);
    let version_of = async |http: &str| -> Option<String> {
        let v: Value = reqwest::get(format!("{http}/v1/policy"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["version"].as_str().map(str::to_string)
    };
    let v1 = a.version().await;
    eventually("b follows the directory's version", WAIT, async || {
        version_of(b.http()).await.as_deref() == Some(v1.as_str())
    })
    .await;

    a.nats.kill9();
    a.nats.restart().expect("nats-server restarts");
    for replica in [a.commander.http(), b.http()] {
        eventually("ready again once NATS is back", WAIT, async || {
            reqwest::get(format!("{replica}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    let (status, body) = a
        .put(
            "[[throttle]]\nname = \"after\"\nscope = \"team\"\ntasks_per_s = 5\n",
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v2 = body["version"].as_str().unwrap().to_string();
    for replica in [a.commander.http(), b.http()] {
        eventually("the push is in force on every replica", WAIT, async || {
            version_of(replica).await.as_deref() == Some(v2.as_str())
        })
        .await;
        let p: Value = reqwest::get(format!("{replica}/v1/policy"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(p.to_string().contains("\"after\""), "{p}");
    }
}

/// A registry with one more model than the built-in one, and a copy of the default rubric,
/// in `dir`; the config that points at both.
fn configured_sources(dir: &Path) -> (PathBuf, PathBuf, String) {
    let shipped = |f: &str| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(f)).unwrap()
    };
    let models = dir.join("models.toml");
    std::fs::write(
        &models,
        format!(
            "{}\n[[model]]\nname = \"house-model\"\nprovider = \"openai\"\ncontext_window = 32000\ntier = \"economy\"\ninput_per_mtok = 0.05\noutput_per_mtok = 0.1\n",
            shipped("policies/models.toml")
        ),
    )
    .unwrap();
    let rubric = dir.join("rubric.toml");
    std::fs::write(&rubric, shipped("routing-rubrics/default.toml")).unwrap();
    let extra = format!(
        "[telemetry]\nmodel_registry = {models:?}\n[classifier]\nrubric = {rubric:?}\n[pools.code]\n[pools.docs]\n[pools.general]\n"
    );
    (models, rubric, extra)
}

/// The default rubric with `house-model` as one more candidate of the simple tier.
fn rubric_with_house_model(rubric: &Path) -> String {
    let text = std::fs::read_to_string(rubric).unwrap();
    let at = text.find("[[tier.candidate]]").expect("a candidate");
    format!(
        "{}[[tier.candidate]]\nmodel = \"house-model\"\npools = [\"alpha\"]\n{}",
        &text[..at],
        &text[at..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rubric_naming_a_model_only_the_configured_registry_has_hot_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (_, rubric, extra) = configured_sources(dir.path());
    let s = PolicyStack::start("", &extra).await;
    let before = s.get("/v1/classifier").await["rubric"]["generation"]
        .as_u64()
        .unwrap();
    std::fs::write(&rubric, rubric_with_house_model(&rubric)).unwrap();
    let mut c = Value::Null;
    eventually("the rubric edit is in force", WAIT, async || {
        c = s.get("/v1/classifier").await;
        c["rubric"]["generation"].as_u64() > Some(before)
    })
    .await;
    assert!(c["rubric"]["last_reload_error"].is_null(), "{c}");
    assert!(c.to_string().contains("house-model"), "{c}");
    // Audited with the policy changes.
    let h = s.get("/v1/policy/history").await;
    let rec = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == "rubric")
        .unwrap_or_else(|| panic!("{h}"));
    assert_eq!(rec["accepted"], true, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_edit_removing_a_model_in_use_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (models, rubric, extra) = configured_sources(dir.path());
    std::fs::write(&rubric, rubric_with_house_model(&rubric)).unwrap();
    // The policy names the model too.
    let s = PolicyStack::start(
        "[[budget]]\nname = \"house\"\nscope = \"model\"\nmatch = \"house-model\"\nwindow = \"day\"\nlimit_usd = 5.0\naction = \"reject\"\n",
        &extra,
    )
    .await;
    let v = s.get("/v1/models").await;
    let (n, generation) = (
        v["models"].as_array().unwrap().len(),
        v["generation"].clone(),
    );

    let text = std::fs::read_to_string(&models).unwrap();
    let at = text.find("[[model]]\nname = \"house-model\"").unwrap();
    std::fs::write(&models, &text[..at]).unwrap();
    let mut v = Value::Null;
    eventually("the refusal is visible", WAIT, async || {
        v = s.get("/v1/models").await;
        v["last_reload_error"].is_string()
    })
    .await;
    let err = v["last_reload_error"].as_str().unwrap();
    let (models_file, rubric_file) = (models.display().to_string(), rubric.display().to_string());
    assert!(err.contains(&models_file), "{err}");
    assert!(
        err.contains(&format!("{rubric_file}:")),
        "names the rubric's line: {err}"
    );
    assert!(
        err.contains("main.policy.toml:"),
        "names the policy's line: {err}"
    );
    assert!(err.contains("house-model"), "{err}");
    // The registry in force is the one before the edit.
    assert_eq!(v["models"].as_array().unwrap().len(), n);
    assert_eq!(v["generation"], generation);
    let h = s.get("/v1/policy/history").await;
    let rec = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == "registry")
        .unwrap_or_else(|| panic!("{h}"));
    assert_eq!(rec["accepted"], false, "{rec}");
    assert!(!rec["errors"].as_array().unwrap().is_empty(), "{rec}");
}

/// The commander stopped between a dispatch's PubAck and the batch's store flush, and after
/// the restart the worker's result reached the store before the intake message came back.
/// Played here without a crash (the results are published first): the redelivered
/// submission is decided again for the record, marked `recovered`, its cost charged to the
/// budget that covers it, and it is not dispatched a second time. A budget over its limit
/// rejects a new task, but not the record of one that ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_finished_before_its_dispatch_was_recorded_gets_its_decision_and_cost() {
    let policy = "[[budget]]\nname = \"fleet-day\"\nscope = \"fleet\"\nwindow = \"day\"\nlimit_usd = 0.2\naction = \"reject\"\n";
    let s = PolicyStack::start(policy, "").await;
    let js = async_nats::jetstream::new(s.client.clone());
    for id in ["ran-early", "ran-later"] {
        let result = serde_json::json!({
            "schema": 1, "task_id": id, "attempt": 1, "status": "ok",
            "worker_id": "w-early", "pool": "alpha",
            "usage": {"model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.25},
        });
        js.publish(format!("fleet.results.{id}"), result.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually("the results are recorded", WAIT, async || {
        for id in ["ran-early", "ran-later"] {
            let done = task_record(s.commander.http(), id)
                .await
                .is_some_and(|r| r["state"] == "completed");
            if !done {
                return false;
            }
        }
        true
    })
    .await;
    let before = task_record(s.commander.http(), "ran-early").await.unwrap();
    assert!(before["decision_id"].is_null(), "{before}");
    let spent = async || s.get("/v1/policy").await["standing"][0]["spent_usd"].as_f64();
    assert_eq!(spent().await, Some(0.0), "no reservation to settle yet");
    let recovered = async || {
        let text = reqwest::get(s.http("/metrics")).await.unwrap().text();
        sample_value(&text.await.unwrap(), "fleet_intake_recovered_total ")
    };
    let submit = async |id: &str| {
        let body = format!(r#"{{"schema":1,"description":"task {id}","pool":"alpha"}}"#);
        publish_raw(&s.client, &[("Fleet-Task-Id", id)], &body).await
    };
    let decided = async |id: &str| {
        eventually("the submission is recorded", WAIT, async || {
            task_record(s.commander.http(), id)
                .await
                .is_some_and(|r| r["decision_at_ms"].is_u64())
        })
        .await;
    };

    let seq = submit("ran-early").await;
    decided("ran-early").await;
    assert_eq!(recovered().await, 1.0);
    let rec = task_record(s.commander.http(), "ran-early").await.unwrap();
    assert_eq!(rec["state"], "completed", "{rec}");
    assert_eq!(rec["intake_sequence"], seq, "{rec}");
    assert_eq!(rec["pool"], "alpha", "{rec}");
    assert_eq!(rec["outcome"]["worker_id"], "w-early", "{rec}");
    let states: Vec<&str> = rec["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["completed"],
        "no dispatch at a made-up time: {rec}"
    );
    let d = s.get("/v1/decisions/ran-early").await;
    assert_eq!(d["id"], rec["decision_id"], "{d}");
    assert_eq!(d["outcome"], "dispatched", "{d}");
    assert_eq!(d["recovered"], true, "{d}");
    assert_eq!(d["pool"], "alpha", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("decided again after a restart"),
        "{d}"
    );
    // The worker's figure is charged, nothing is left reserved, nothing is sent again.
    let st = &s.get("/v1/policy").await["standing"][0];
    assert_eq!(st["spent_usd"].as_f64(), Some(0.25), "{st}");
    assert!(st["reserved_usd"].as_f64().unwrap() < 1e-12, "{st}");
    assert_eq!(stream_messages(&s.client, "FLEET_WORK").await, 0);

    // The budget is over its limit now: a new task is rejected …
    submit("ordinary").await;
    decided("ordinary").await;
    let d = s.get("/v1/decisions/ordinary").await;
    assert_eq!(d["outcome"], "rejected", "{d}");
    assert!(d.get("recovered").is_none(), "{d}");
    // … but a task that ran is still recorded, and charged.
    submit("ran-later").await;
    decided("ran-later").await;
    assert_eq!(recovered().await, 2.0);
    let d = s.get("/v1/decisions/ran-later").await;
    assert_eq!(d["outcome"], "dispatched", "{d}");
    assert_eq!(d["recovered"], true, "{d}");
    assert_eq!(spent().await, Some(0.5));
    assert_eq!(stream_messages(&s.client, "FLEET_WORK").await, 0);
}
