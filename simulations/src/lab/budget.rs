//! `fleet-sim scenario budget_overrun --stack`: a team's spending runs past its budget on
//! the real task path. Budgets act on tasks as they are routed, so this fault needs what
//! the simulated agents do not have: producers submitting real tasks and workers taking
//! them. It runs on the stack only (a nats-server and the `commander` binary, fleet time
//! compressed by `[clock] speed`):
//!
//! - team `search` submits tasks (Poisson arrivals, `rate_per_min` a fleet minute) to pool
//!   `support`, where two SDK workers answer each at once, reporting the task's estimated
//!   cost as its actual cost;
//! - a probe task tells what one task is estimated at; the budget, `search-hourly` (team
//!   `search`, rolling hour, soft alert at 80 %, defer at 100 %), is then written into the
//!   commander's policy directory with a limit of twice the healthy hour's spend;
//! - at the onset a runaway producer (a batch job, a retry storm) multiplies the team's
//!   arrivals by `surge`.
//!
//! Detection is the commander's `budget_soft_threshold` notice on
//! `<prefix>.alerts.warning`; the intervention is the deferral at 100 %, measured as the
//! spend it held back; and nothing accepted may be lost: every accepted task completes or
//! is stored deferred with a reason the producer can read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_testkit::{Commander, CommanderOptions, NatsServer, commander_bin};
use fleet_worker::{
    Producer, Subjects, SubmitOptions, Task, TaskOutput, Usage, Worker, WorkerConfig,
};
use futures::StreamExt;

use super::agents::Rng;
use super::stack::{fleet_ms, wall_ms_of, wall_now_ms};

/// How to run the budget overrun.
#[derive(Clone, Debug)]
pub struct BudgetOptions {
    /// Fleet seconds per wall second.
    pub speed: f64,
    /// The commander binary (default: beside this one).
    pub bin: Option<std::path::PathBuf>,
    /// Healthy fleet minutes before the onset.
    pub healthy_min: u64,
    /// Fleet minutes after it.
    pub after_min: u64,
    /// The team's tasks per fleet minute while healthy.
    pub rate_per_min: f64,
    /// How many times the arrivals multiply at the onset.
    pub surge: f64,
    pub seed: u64,
}

impl Default for BudgetOptions {
    fn default() -> Self {
        Self {
            speed: 30.0,
            bin: None,
            healthy_min: 30,
            after_min: 20,
            rate_per_min: 12.0,
            surge: 8.0,
            seed: 1,
        }
    }
}

const TEAM: &str = "search";
const BUDGET: &str = "search-hourly";
const POOL: &str = "support";
/// The soft threshold the budget alerts at.
const SOFT_AT: f64 = 0.8;

/// What the run measured.
#[derive(Clone, Debug, Default)]
pub struct BudgetOutcome {
    pub opts_surge: f64,
    /// One task's estimated cost, and the budget's limit per rolling hour.
    pub est_usd: f64,
    pub limit_usd: f64,
    /// Tasks the producers were told are accepted, before and after the onset.
    pub accepted_before: u64,
    pub accepted_after: u64,
    /// Soft-threshold notices before the onset (false alarms).
    pub alerts_before: u64,
    /// The first notice after the onset: fleet seconds after it, and what it said.
    pub alert: Option<(u64, String)>,
    /// Fleet seconds from the onset to the second in which the estimates of the tasks
    /// submitted since the budget came into force passed the soft threshold: when the
    /// notice was due (the probe ran before the budget and is not counted).
    pub crossed_s: Option<u64>,
    /// Fleet seconds from the onset to the first task stored deferred.
    pub first_deferral_s: Option<u64>,
    /// At the end: tasks completed, tasks stored deferred, and tasks neither (lost).
    pub completed: u64,
    pub deferred: u64,
    pub lost: u64,
    /// What one deferred task's record tells its producer.
    pub deferred_reason: Option<String>,
    /// Spent + reserved under the budget at the end, and what the accepted tasks would
    /// have cost had nothing been deferred.
    pub committed_usd: f64,
    pub unchecked_usd: f64,
    /// The commander's peak resident memory (MiB) and wall seconds the run took.
    pub rss_peak_mib: f64,
    pub took_s: f64,
}

impl BudgetOutcome {
    /// Detected after the onset, nothing before it, nothing lost, and spending held at
    /// the limit.
    pub fn passed(&self) -> bool {
        self.alert.is_some()
            && self.alerts_before == 0
            && self.lost == 0
            && self.deferred > 0
            && self.committed_usd <= self.limit_usd * 1.000_001
    }
}

fn config_toml(origin_ms: u64, speed: f64, policies: &std::path::Path) -> String {
    format!(
        "[clock]\nspeed = {speed}\norigin_ms = {origin_ms}\n\n[routing]\ndefault_pool = {POOL:?}\n\n[pools.{POOL}]\n\n[policy]\ndir = {:?}\nrelease_interval_ms = 200\n",
        policies.display().to_string()
    )
}

fn budget_toml(limit_usd: f64) -> String {
    format!(
        "[[budget]]\nname = {BUDGET:?}\nscope = \"team\"\nmatch = {TEAM:?}\nwindow = \"1h\"\nlimit_usd = {limit_usd}\naction = \"defer\"\nsoft = [{{ at = {SOFT_AT}, action = \"alert\" }}]\n"
    )
}

fn task(n: u64) -> Task {
    let mut t = Task::new(format!(
        "Summarise the search quality report for week {}",
        n % 52
    ));
    t.id = Some(format!("budget-{n}"));
    t.pool = Some(POOL.into());
    t.attributes.insert("team".into(), TEAM.into());
    t
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<serde_json::Value, String> {
    http.get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// Two workers on the pool that answer at once, charging `est` (f64 bits) per task.
async fn start_workers(
    client: &async_nats::Client,
    est_bits: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) -> Result<Vec<fleet_worker::WorkerHandle>, String> {
    let mut workers = Vec::new();
    for w in 0..2 {
        let mut cfg = WorkerConfig::new(POOL, format!("{POOL}-w{w}"));
        cfg.max_in_flight = 64;
        let (est_bits, done) = (est_bits.clone(), done.clone());
        workers.push(
            Worker::start(client.clone(), cfg, move |_ctx| {
                let cost = f64::from_bits(est_bits.load(Ordering::Relaxed));
                let done = done.clone();
                async move {
                    done.fetch_add(1, Ordering::Relaxed);
                    Ok(TaskOutput {
                        output: serde_json::Value::Null,
                        usage: Some(Usage {
                            model: None,
                            input_tokens: 0,
                            output_tokens: 0,
                            cost_usd: (cost > 0.0).then_some(cost),
                        }),
                    })
                }
            })
            .await
            .map_err(|e| e.to_string())?,
        );
    }
    Ok(workers)
}

/// The budget's notices as they arrive: (wall ms, the notice).
fn soft_notices(
    mut sub: async_nats::Subscriber,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<(u64, serde_json::Value)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload)
                && v["alert"] == "budget_soft_threshold"
                && v["budget"] == BUDGET
            {
                let _ = tx.send((wall_now_ms(), v));
            }
        }
    });
    (rx, task)
}

/// One task through, before any budget: what such a task is estimated at.
async fn probe(producer: &Producer, http: &reqwest::Client, api: &str) -> Result<f64, String> {
    let mut t = task(0);
    t.id = Some("budget-probe".into());
    producer
        .submit(&t, SubmitOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    producer
        .await_result("budget-probe", Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    // The intake batch logs its decisions after the batch's PubAcks, and a fast worker's
    // result can reach the producer before that: the decision may be a moment behind it.
    let url = format!("{api}/v1/decisions/budget-probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut d = get_json(http, &url).await?;
    while d["est_cost_usd"].is_null() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        d = get_json(http, &url).await?;
    }
    d["est_cost_usd"]
        .as_f64()
        .filter(|e| *e > 0.0)
        .ok_or_else(|| format!("the probe's decision has no estimated cost: {d}"))
}

/// Writes the budget into the policy directory and waits until it is in force.
async fn put_budget(
    policies: &std::path::Path,
    limit_usd: f64,
    http: &reqwest::Client,
    api: &str,
) -> Result<(), String> {
    let tmp = policies.join(".budget.tmp");
    std::fs::write(&tmp, budget_toml(limit_usd)).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, policies.join("budget.policy.toml")).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let p = get_json(http, &format!("{api}/v1/policy")).await?;
        let has = p["budgets"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["name"] == BUDGET));
        if has {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the budget was not in force within 20 s".into())
}

/// Runs the scenario: healthy arrivals, the surge, then the count of what became of every
/// accepted task.
pub async fn run(opts: &BudgetOptions) -> Result<BudgetOutcome, String> {
    let started = Instant::now();
    let nats = NatsServer::start().map_err(|e| e.to_string())?;
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).map_err(|e| e.to_string())?;
    let origin_ms = wall_now_ms();
    let commander = Commander::start(&CommanderOptions {
        bin: opts.bin.clone().unwrap_or_else(commander_bin),
        nats_url: Some(nats.url().to_string()),
        config_toml: config_toml(origin_ms, opts.speed, &policies),
        data_dir: dir.path().join("cmd"),
        extra_env: vec![("RUST_LOG".into(), "warn,fleet_commander::serve=info".into())],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;
    let pid = commander.pid().ok_or("the commander has no pid")?;
    let api = commander.http().to_string();
    let http = reqwest::Client::new();
    let producer = Producer::new(client.clone(), Subjects::default());
    let est_bits = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let workers = start_workers(&client, est_bits.clone(), done.clone()).await?;

    let est = probe(&producer, &http, &api).await?;
    est_bits.store(est.to_bits(), Ordering::Relaxed);
    // A healthy hour spends half the limit.
    let limit = 2.0 * est * opts.rate_per_min * 60.0;
    put_budget(&policies, limit, &http, &api).await?;
    let (mut notices, listener) = soft_notices(
        client
            .subscribe("fleet.alerts.warning")
            .await
            .map_err(|e| e.to_string())?,
    );

    let mut out = BudgetOutcome {
        opts_surge: opts.surge,
        est_usd: est,
        limit_usd: limit,
        ..Default::default()
    };
    let accepted = Arc::new(AtomicU64::new(0));
    let onset_s = opts.healthy_min * 60;
    let t0 = (fleet_ms(origin_ms, opts.speed, wall_now_ms()) / 1000 + 2) * 1000;
    let onset_fleet_ms = t0 + onset_s * 1000;
    let mut rng = Rng::new(opts.seed);
    let mut n = 0u64;
    let mut acks = tokio::task::JoinSet::new();
    let seconds = (opts.healthy_min + opts.after_min) * 60;
    let bar = super::progress(seconds, "budget_overrun", "fleet seconds");
    for sec in 0..seconds {
        bar.set_position(sec);
        let due = wall_ms_of(origin_ms, opts.speed, t0 + sec * 1000);
        let wall = wall_now_ms();
        if wall < due {
            tokio::time::sleep(Duration::from_millis(due - wall)).await;
        }
        let rate = opts.rate_per_min / 60.0 * if sec >= onset_s { opts.surge } else { 1.0 };
        for _ in 0..rng.poisson(rate) {
            n += 1;
            if out.crossed_s.is_none() && n as f64 * est >= SOFT_AT * limit && sec >= onset_s {
                out.crossed_s = Some(sec - onset_s);
            }
            let (producer, accepted, t) = (producer.clone(), accepted.clone(), task(n));
            let after = sec >= onset_s;
            acks.spawn(async move {
                let ok = producer.submit(&t, SubmitOptions::default()).await.is_ok();
                if ok {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                (ok, after)
            });
        }
        // Every 10 fleet seconds after the onset, until the first deferral is seen.
        if sec % 10 == 0 && sec >= onset_s && out.first_deferral_s.is_none() {
            let d = get_json(&http, &format!("{api}/v1/tasks?state=deferred&limit=1")).await?;
            if d["total"].as_u64().unwrap_or(0) > 0 {
                out.first_deferral_s = Some(sec - onset_s);
            }
        }
    }
    bar.finish_and_clear();
    while let Some(r) = acks.join_next().await {
        match r {
            Ok((true, false)) => out.accepted_before += 1,
            Ok((true, true)) => out.accepted_after += 1,
            _ => {}
        }
    }
    while let Ok((wall, v)) = notices.try_recv() {
        let at = fleet_ms(origin_ms, opts.speed, wall);
        if at < onset_fleet_ms {
            out.alerts_before += 1;
        } else if out.alert.is_none() {
            out.alert = Some(((at - onset_fleet_ms) / 1000, notice_words(&v)));
        }
    }
    listener.abort();
    settle(&mut out, &done, &http, &api).await?;
    // VmHWM: the peak over the whole run.
    out.rss_peak_mib =
        crate::bench::telemetry::rss_kib(pid).map_or(0, |(_, peak)| peak) as f64 / 1024.0;
    for w in workers {
        w.shutdown().await;
    }
    // The lab's own connections go before the server does, or their reconnect attempts
    // fill the log of whatever runs next.
    drop(producer);
    drop(client);
    drop(commander);
    drop(nats);
    out.took_s = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Waits (up to 30 s) until every accepted task is completed or stored deferred, then
/// counts them, one deferred task's reason and the budget's standing.
async fn settle(
    out: &mut BudgetOutcome,
    done: &AtomicU64,
    http: &reqwest::Client,
    api: &str,
) -> Result<(), String> {
    // The probe ran before the budget and is not one of the scenario's tasks.
    let accepted = out.accepted_before + out.accepted_after;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = get_json(http, &format!("{api}/v1/tasks?state=deferred&limit=1")).await?;
        out.deferred = d["total"].as_u64().unwrap_or(0);
        out.completed = done.load(Ordering::Relaxed).saturating_sub(1);
        if let Some(id) = d["tasks"][0]["task_id"].as_str() {
            let record = get_json(http, &format!("{api}/v1/tasks/{id}")).await?;
            out.deferred_reason = record["deferred"]["reason"].as_str().map(str::to_string);
        }
        if out.completed + out.deferred >= accepted || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out.lost = accepted.saturating_sub(out.completed + out.deferred);
    let p = get_json(http, &format!("{api}/v1/policy")).await?;
    if let Some(st) = p["standing"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["budget"] == BUDGET))
    {
        out.committed_usd =
            st["spent_usd"].as_f64().unwrap_or(0.0) + st["reserved_usd"].as_f64().unwrap_or(0.0);
    }
    out.unchecked_usd = accepted as f64 * out.est_usd;
    Ok(())
}

/// The notice in words, as an operator reads it.
fn notice_words(v: &serde_json::Value) -> String {
    format!(
        "budget {} (team {}) at {:.0}% of ${:.2} per {} (soft threshold {:.0}%)",
        v["budget"].as_str().unwrap_or("?"),
        v["value"].as_str().unwrap_or("?"),
        v["used"].as_f64().unwrap_or(0.0) * 100.0,
        v["limit_usd"].as_f64().unwrap_or(0.0),
        v["window"].as_str().unwrap_or("?"),
        v["threshold"].as_f64().unwrap_or(0.0) * 100.0
    )
}

#[expect(
    clippy::print_stdout,
    reason = "the scenario's result is what the command prints"
)]
pub fn print(o: &BudgetOutcome) {
    println!(
        "{} budget_overrun: {}",
        if o.passed() { "PASS" } else { "FAIL" },
        match &o.alert {
            Some((s, m)) => format!("detected {s} s after the onset: {m}"),
            None => "NOT DETECTED".into(),
        }
    );
    println!(
        "  the submitted tasks' estimates passed {:.0}% of the limit {} s after the onset",
        SOFT_AT * 100.0,
        o.crossed_s.map_or("-".into(), |s| s.to_string())
    );
    println!(
        "  one task ~${:.5}; limit ${:.2} per rolling hour (a healthy hour spends half); arrivals x{} at the onset",
        o.est_usd, o.limit_usd, o.opts_surge
    );
    println!(
        "  accepted {} before and {} after the onset; completed {}, stored deferred {}, lost {}; notices before the onset {}",
        o.accepted_before, o.accepted_after, o.completed, o.deferred, o.lost, o.alerts_before
    );
    println!(
        "  first deferral {} s after the onset; committed ${:.2} of ${:.2} (without the budget: ${:.2}, so ${:.2} held back)",
        o.first_deferral_s.map_or("-".into(), |s| s.to_string()),
        o.committed_usd,
        o.limit_usd,
        o.unchecked_usd,
        (o.unchecked_usd - o.committed_usd).max(0.0)
    );
    if let Some(r) = &o.deferred_reason {
        println!("  a deferred task's record says: {r}");
    }
    println!(
        "  commander peak RSS {:.0} MiB; the run took {:.0} s",
        o.rss_peak_mib, o.took_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smoke run on the real stack: a short healthy spell, the surge, the notice, the
    /// deferrals, nothing lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_budget_overrun_is_noticed_deferred_and_nothing_is_lost() {
        let o = run(&BudgetOptions {
            speed: 60.0,
            healthy_min: 10,
            after_min: 20,
            rate_per_min: 12.0,
            surge: 12.0,
            ..Default::default()
        })
        .await
        .expect("the stack runs");
        print(&o);
        assert!(o.alert.is_some() && o.alerts_before == 0, "{o:?}");
        assert!(o.deferred > 0, "the limit deferred tasks: {o:?}");
        assert_eq!(o.lost, 0, "{o:?}");
        assert!(o.committed_usd <= o.limit_usd * 1.000_001, "{o:?}");
        assert!(
            o.deferred_reason
                .as_deref()
                .is_some_and(|r| r.contains(BUDGET)),
            "{o:?}"
        );
    }
}
