//! `fleet-sim scenario <name> --stack`: the same simulated fleet against the real stack.
//!
//! A private nats-server (JetStream on, a port of its own) and the `commander` binary, with
//! fleet time compressed by the commander's `[clock] speed` so an hour of fleet time runs
//! in minutes. The agents are the in-process lab's (`agents.rs`), stepped once per fleet
//! second on the wall-clock instant that second falls on, and what they say goes over the
//! wire as workers send it:
//! - heartbeats on `<prefix>.telemetry.<pool>.<worker>` (`Fleet-Kind: heartbeat`);
//! - spans of even-numbered agents the SDK way, on that subject (`Fleet-Kind:
//!   otlp-traces`), and of odd-numbered ones as OTLP/HTTP to the commander's receiver,
//!   batched as a collector in front of them would (`POST /v1/traces`, up to 64 agents'
//!   exports per request).
//!
//! Alerts are read where any subscriber reads them (`<prefix>.alerts.>`), the agents obey
//! the control commands the escalation ladder sends (protocol.md §10), and the
//! interventions, the fleet's burn rate and the commander's CPU and memory are read from
//! its API and `/proc` as the run goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleet_commander::detect::Rule;
use fleet_testkit::{Commander, CommanderOptions, NatsServer, commander_bin};
use futures::StreamExt;
use serde::Deserialize;

use super::agents::{Command, Mode, SimFleet};
use super::{Fault, Fired, Outcome, Scenario};

/// How to run a scenario on the stack.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Fleet seconds per wall second.
    pub speed: f64,
    /// The commander binary (default: beside this one).
    pub bin: Option<PathBuf>,
    /// A policy directory for the commander (the lab's escalation ladder); none: the
    /// built-in policy.
    pub policy_dir: Option<PathBuf>,
}

/// Why a scenario cannot run on the stack, if it cannot.
pub fn unsupported(fault: Option<Fault>) -> Option<&'static str> {
    match fault {
        Some(Fault::QueueSaturation | Fault::OverProvisioned | Fault::PoolOutage) => Some(
            "the commander reads queue depths from JetStream, and the lab's agents take no real tasks",
        ),
        _ => None,
    }
}

/// What a run on the stack measured beyond what fired.
#[derive(Clone, Debug, Default)]
pub struct StackFigures {
    /// Interventions the commander recorded (`GET /v1/interventions`): action, rule,
    /// target, outcome, and the fleet second it started.
    pub interventions: Vec<Intervention>,
    /// The fleet's burn rate (USD/h, from `GET /v1/fleet`) every 10 fleet seconds.
    pub burn: Vec<(u64, f64)>,
    /// The hit agents' tokens per fleet minute before the first intervention on one of
    /// them, and after it (None without one).
    pub hit_tokens_per_min: Option<(f64, f64)>,
    /// The commander's CPU over the run, in % of one core.
    pub cpu_pct: f64,
    /// Its peak resident memory, in MiB.
    pub rss_peak_mib: f64,
    /// How far behind its wall-clock instant the lab stepped a fleet second, at worst.
    pub max_lag_ms: u64,
    /// Spans sent over NATS and over OTLP/HTTP, and HTTP exports refused.
    pub spans_nats: u64,
    pub spans_http: u64,
    pub http_refused: u64,
    /// Control commands the agents obeyed.
    pub commands: u64,
}

/// One intervention, as the API reports it.
#[derive(Clone, Debug)]
pub struct Intervention {
    pub action: String,
    pub rule: String,
    pub target: String,
    pub outcome: String,
    pub at_s: u64,
}

/// An alert event as the commander publishes it on `<prefix>.alerts.<severity>`.
#[derive(Deserialize)]
struct AlertEvent {
    event: String,
    alert: AlertBody,
}

#[derive(Deserialize)]
struct AlertBody {
    rule: Rule,
    labels: BTreeMap<String, String>,
    message: String,
    #[serde(default)]
    firing_ms: Option<u64>,
}

/// A control command, as protocol.md §10 writes it (the fields the agents act on).
#[derive(Deserialize)]
struct ControlRequest {
    command: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
}

/// The fleet time the commander's clock shows at `wall_ms` (its `[clock]` formula).
pub(super) fn fleet_ms(origin_ms: u64, speed: f64, wall_ms: u64) -> u64 {
    let ahead = wall_ms.saturating_sub(origin_ms) as f64 * speed;
    origin_ms.saturating_add(ahead as u64)
}

/// The wall-clock instant at which fleet time shows `fleet`.
pub(super) fn wall_ms_of(origin_ms: u64, speed: f64, fleet: u64) -> u64 {
    let ahead = fleet.saturating_sub(origin_ms) as f64 / speed;
    origin_ms.saturating_add(ahead as u64)
}

pub(super) fn wall_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The commander's config for a lab run: the lab's pools, compressed time, no agent taken
/// for lost while the lab runs, and the lab's policy if given.
fn config_toml(agents: usize, origin_ms: u64, opts: &StackOptions) -> String {
    let mut toml = format!(
        "[clock]\nspeed = {}\norigin_ms = {origin_ms}\n\n[fleet]\nmax_workers = {}\n\n",
        opts.speed,
        (agents * 2).max(64)
    );
    if let Some(dir) = &opts.policy_dir {
        toml.push_str(&format!("[policy]\ndir = {dir:?}\n\n"));
    }
    let depth = super::agents::max_queue_depth(agents);
    for (pool, _, _) in super::agents::POOLS {
        toml.push_str(&format!("[pools.{pool}]\nmax_queue_depth = {depth}\n\n"));
    }
    toml
}

/// What the lab listens to while it runs: alerts and control commands.
struct Listeners {
    alerts: tokio::sync::mpsc::UnboundedReceiver<AlertBody>,
    control: tokio::sync::mpsc::UnboundedReceiver<(String, Command)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Subscribes to the alerts and to every agent's control subject. Commands are answered
/// from the mode the agent will be in once the lab applies them on its next step.
async fn listen(client: &async_nats::Client) -> Result<Listeners, String> {
    let (alert_tx, alerts) = tokio::sync::mpsc::unbounded_channel();
    let (control_tx, control) = tokio::sync::mpsc::unbounded_channel();
    let mut alert_sub = client
        .subscribe("fleet.alerts.>")
        .await
        .map_err(|e| e.to_string())?;
    let mut control_sub = client
        .subscribe("fleet.control.>")
        .await
        .map_err(|e| e.to_string())?;
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        while let Some(m) = alert_sub.next().await {
            if let Ok(ev) = serde_json::from_slice::<AlertEvent>(&m.payload)
                && ev.event == "firing"
            {
                let _ = alert_tx.send(ev.alert);
            }
        }
    }));
    let replier = client.clone();
    tasks.push(tokio::spawn(async move {
        // Each agent's mode as the commands left it, for the replies.
        let mut modes: BTreeMap<String, Mode> = BTreeMap::new();
        while let Some(m) = control_sub.next().await {
            let worker = m.subject.rsplit('.').next().unwrap_or("").to_string();
            let mode = modes.get(&worker).copied().unwrap_or(Mode::Running);
            let reply = match serde_json::from_slice::<ControlRequest>(&m.payload) {
                Ok(req) => match Command::parse(&req.command, req.task_id.as_deref()) {
                    Some(cmd) => {
                        let after = cmd.mode_after(mode);
                        modes.insert(worker.clone(), after);
                        let _ = control_tx.send((worker.clone(), cmd));
                        serde_json::json!({"schema": 1, "ok": true, "worker_id": worker,
                            "command": req.command, "id": req.id, "mode": after.as_str(),
                            "in_flight": 0})
                    }
                    None => serde_json::json!({"schema": 1, "ok": false, "worker_id": worker,
                        "command": req.command, "id": req.id, "mode": mode.as_str(), "in_flight": 0,
                        "error": {"code": "unknown_command", "message":
                            "a lab agent obeys pause, drain, resume, cancel, restart and status"}}),
                },
                Err(e) => serde_json::json!({"schema": 1, "ok": false, "worker_id": worker,
                    "mode": mode.as_str(), "in_flight": 0,
                    "error": {"code": "bad_request", "message": e.to_string()}}),
            };
            if let Some(to) = m.reply {
                let _ = replier
                    .publish(to, Bytes::from(reply.to_string().into_bytes()))
                    .await;
            }
        }
    }));
    Ok(Listeners {
        alerts,
        control,
        tasks,
    })
}

/// Sends one fleet second's exports: even agents' over NATS, odd agents' merged into
/// OTLP/HTTP requests (concatenated protobuf messages of one type are their merge).
async fn send_spans(
    client: &async_nats::Client,
    http: &reqwest::Client,
    otlp_http: &str,
    sim: &SimFleet,
    traces: Vec<(usize, Bytes, u64)>,
    figures: &mut StackFigures,
    in_flight: &mut tokio::task::JoinSet<bool>,
) -> Result<(), String> {
    let mut batch: Vec<u8> = Vec::new();
    let mut in_batch = 0usize;
    let mut batches = Vec::new();
    for (agent, body, spans) in traces {
        if agent % 2 == 0 {
            let (id, pool) = sim.who(agent);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Fleet-Kind", "otlp-traces");
            headers.insert("Content-Type", "application/x-protobuf");
            client
                .publish_with_headers(format!("fleet.telemetry.{pool}.{id}"), headers, body)
                .await
                .map_err(|e| e.to_string())?;
            figures.spans_nats += spans;
        } else {
            batch.extend_from_slice(&body);
            in_batch += 1;
            figures.spans_http += spans;
            if in_batch == 64 {
                batches.push(std::mem::take(&mut batch));
                in_batch = 0;
            }
        }
    }
    if in_batch > 0 {
        batches.push(batch);
    }
    for body in batches {
        // A bounded number of requests in flight; each answers whether it was taken.
        while in_flight.len() >= 8 {
            if let Some(Ok(false)) = in_flight.join_next().await {
                figures.http_refused += 1;
            }
        }
        let req = http
            .post(format!("{otlp_http}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(body);
        in_flight.spawn(async move { req.send().await.is_ok_and(|r| r.status().is_success()) });
    }
    Ok(())
}

async fn send_heartbeats(
    client: &async_nats::Client,
    sim: &SimFleet,
    heartbeats: Vec<(usize, Vec<u8>)>,
) -> Result<(), String> {
    for (agent, body) in heartbeats {
        let (id, pool) = sim.who(agent);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Fleet-Kind", "heartbeat");
        headers.insert("Content-Type", "application/json");
        client
            .publish_with_headers(
                format!("fleet.telemetry.{pool}.{id}"),
                headers,
                Bytes::from(body),
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The commander's CPU seconds so far and its peak resident memory (KiB), from /proc.
fn proc_figures(pid: u32) -> Option<(f64, u64)> {
    let cpu = crate::bench::stream::cpu_s(pid)?;
    let (_, hwm) = crate::bench::telemetry::rss_kib(pid)?;
    Some((cpu, hwm))
}

/// Runs `scenario` with `agents` agents and `seed` against a fresh nats-server and
/// commander, and reports what fired as the in-process lab does, plus what only the
/// stack shows.
pub async fn run(
    scenario: Scenario,
    agents: usize,
    seed: u64,
    opts: &StackOptions,
) -> Result<(Outcome, StackFigures), String> {
    if let Some(why) = unsupported(scenario.fault) {
        return Err(format!("{} cannot run on the stack: {why}", scenario.name));
    }
    if !(1.0..=1000.0).contains(&opts.speed) {
        return Err(format!("--speed {} is outside 1–1000", opts.speed));
    }
    let started = Instant::now();
    let server = NatsServer::start().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let origin_ms = wall_now_ms();
    let commander = Commander::start(&CommanderOptions {
        bin: opts.bin.clone().unwrap_or_else(commander_bin),
        nats_url: Some(server.url().to_string()),
        config_toml: config_toml(agents, origin_ms, opts),
        data_dir: dir.path().join("cmd"),
        extra_env: vec![],
        extra_args: vec![],
    })
    .map_err(|e| e.to_string())?;
    let pid = commander.pid().ok_or("the commander has no pid")?;
    let otlp_http = commander
        .otlp_http()
        .ok_or("the commander has no OTLP/HTTP receiver")?
        .to_string();
    let client = async_nats::connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    let mut listeners = listen(&client).await?;
    let http = reqwest::Client::new();
    let mut sim = SimFleet::new(agents, seed, scenario.fault);
    let mut figures = StackFigures::default();
    let mut fired = Vec::new();
    let mut hit_tokens = Vec::with_capacity((scenario.minutes * 60) as usize);
    let mut in_flight = tokio::task::JoinSet::new();
    let (cpu0, _) = proc_figures(pid).ok_or("cannot read the commander's /proc")?;
    let wall0 = Instant::now();
    // Fleet time starts on a whole second a little ahead, so the first step is on time.
    let t0 = (fleet_ms(origin_ms, opts.speed, wall_now_ms()) / 1000 + 2) * 1000;
    let bar = super::progress(scenario.minutes * 60, scenario.name, "fleet seconds");
    for sec in 0..scenario.minutes * 60 {
        bar.set_position(sec);
        let now = t0 + sec * 1000;
        let due = wall_ms_of(origin_ms, opts.speed, now);
        let wall = wall_now_ms();
        if wall < due {
            tokio::time::sleep(Duration::from_millis(due - wall)).await;
        } else {
            figures.max_lag_ms = figures.max_lag_ms.max(wall - due);
        }
        while let Ok((worker, cmd)) = listeners.control.try_recv() {
            if sim.obey(&worker, &cmd, now) {
                figures.commands += 1;
            }
        }
        let fault = scenario.fault_at(sec);
        let said = sim.step(sec, now, fault);
        send_heartbeats(&client, &sim, said.heartbeats).await?;
        send_spans(
            &client,
            &http,
            &otlp_http,
            &sim,
            said.traces,
            &mut figures,
            &mut in_flight,
        )
        .await?;
        hit_tokens.push(sim.hit_tokens());
        if sec % 10 == 0
            && let Ok(r) = http
                .get(format!("{}/v1/fleet", commander.http()))
                .send()
                .await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            let burn = v["burn_rate_usd_per_h"].as_f64().unwrap_or(0.0);
            figures.burn.push((sec, burn));
        }
        while let Ok(a) = listeners.alerts.try_recv() {
            fired.push(a);
        }
    }
    bar.finish_and_clear();
    while in_flight.join_next().await.is_some() {}
    // What fired on the last second's evaluation is published by the next tick.
    tokio::time::sleep(Duration::from_secs_f64((2.0 / opts.speed).max(0.2))).await;
    while let Ok(a) = listeners.alerts.try_recv() {
        fired.push(a);
    }
    let (cpu1, hwm) = proc_figures(pid).ok_or("cannot read the commander's /proc")?;
    figures.cpu_pct = (cpu1 - cpu0) * 100.0 / wall0.elapsed().as_secs_f64().max(1e-9);
    figures.rss_peak_mib = hwm as f64 / 1024.0;
    figures.interventions = interventions(&http, commander.http(), t0).await;
    figures.hit_tokens_per_min = effect(&hit_tokens, &figures.interventions, &sim);
    // The lab's connection goes first, so the server's exit is not an error to it.
    drop(listeners);
    drop(client);
    drop(commander);
    drop(server);
    let mut out = Outcome::new(scenario, agents, seed);
    out.spans = figures.spans_nats + figures.spans_http;
    out.heartbeats = sim.heartbeats_sent();
    for a in fired {
        let at_s = a.firing_ms.unwrap_or(t0).saturating_sub(t0) / 1000;
        out.record(Fired {
            rule: a.rule,
            labels: a.labels,
            message: a.message,
            at_s,
            past_threshold_ms: None,
        });
    }
    out.took_s = started.elapsed().as_secs_f64();
    Ok((out, figures))
}

/// What only the stack shows, printed under the outcome.
#[expect(clippy::print_stdout, reason = "the report is what the command prints")]
pub fn print_figures(f: &StackFigures) {
    println!(
        "  stack: {} spans over NATS, {} over OTLP/HTTP ({} requests refused); the lab stepped at worst {} ms late",
        f.spans_nats, f.spans_http, f.http_refused, f.max_lag_ms
    );
    println!(
        "  commander: {:.0} % of a core on average, peak RSS {:.0} MiB; {} control commands obeyed",
        f.cpu_pct, f.rss_peak_mib, f.commands
    );
    for i in &f.interventions {
        println!(
            "  intervention at {} s: {} {} for {} ({})",
            i.at_s, i.action, i.target, i.rule, i.outcome
        );
    }
    if let Some((before, after)) = f.hit_tokens_per_min {
        println!(
            "  hit agents' tokens/min: {before:.0} before the first intervention, {after:.0} after"
        );
    }
}

/// The interventions the commander recorded, with the fleet second each started at.
async fn interventions(http: &reqwest::Client, api: &str, t0: u64) -> Vec<Intervention> {
    let Ok(r) = http
        .get(format!("{api}/v1/interventions?limit=1000"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return Vec::new();
    };
    let list = v["interventions"]
        .as_array()
        .or_else(|| v.as_array())
        .cloned()
        .unwrap_or_default();
    // A target is an object naming its scope (`{"worker": "sim-0000"}`): "worker sim-0000".
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} {}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    let mut out: Vec<Intervention> = list
        .iter()
        .map(|i| Intervention {
            action: text(&i["action"]),
            rule: text(&i["rule"]),
            target: text(&i["target"]),
            outcome: text(&i["state"]),
            at_s: i["applied_ms"].as_u64().unwrap_or(t0).saturating_sub(t0) / 1000,
        })
        .collect();
    out.sort_by_key(|i| i.at_s);
    out
}

/// The hit agents' tokens per minute over (at most) five minutes before the first
/// intervention that names one of them, and over the rest of the run after it.
fn effect(
    hit_tokens: &[u64],
    interventions: &[Intervention],
    sim: &SimFleet,
) -> Option<(f64, f64)> {
    let first = interventions
        .iter()
        .find(|i| sim.is_hit(&i.target))
        .map(|i| i.at_s as usize)?;
    let end = hit_tokens.len().checked_sub(1)?;
    let at = first.min(end);
    let from = at.saturating_sub(300);
    let per_min = |a: usize, b: usize| {
        if b <= a {
            return 0.0;
        }
        (hit_tokens[b] - hit_tokens[a]) as f64 * 60.0 / (b - a) as f64
    };
    Some((per_min(from, at), per_min(at, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(name: &str) -> Scenario {
        super::super::SCENARIOS
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
    }

    fn options(speed: f64) -> StackOptions {
        let bin = commander_bin();
        assert!(
            bin.exists(),
            "no commander binary at {}: `cargo test --workspace` builds it (or `cargo build -p fleet-commander`)",
            bin.display()
        );
        StackOptions {
            speed,
            bin: Some(bin),
            policy_dir: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/lab-policies"
            ))),
        }
    }

    /// The smoke run on the real stack: a nats-server and the commander binary with fleet
    /// time at 30× and 40× (a debug build keeps up with that; at 100× on two busy cores
    /// its ingest fell behind enough for runs to look silent). A context fill is seen
    /// within seconds; a cost runaway is detected, the lab's ladder pauses the agent (a
    /// control command the simulated agent obeys) and its spending falls; nothing fires
    /// before either onset.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_the_stack_faults_are_detected_and_a_runaway_is_paused() {
        let (o, f) = run(scenario("context_critical"), 36, 1, &options(30.0))
            .await
            .unwrap();
        assert!(o.passed(), "{:?} {:?}", o.detection, o.false_alarms);
        assert!(
            f.spans_nats > 0 && f.spans_http > 0 && f.http_refused == 0,
            "{f:?}"
        );

        let (o, f) = run(scenario("cost_runaway"), 36, 1, &options(40.0))
            .await
            .unwrap();
        assert!(o.passed(), "{:?} {:?}", o.detection, o.false_alarms);
        assert!(
            f.interventions
                .iter()
                .any(|i| i.action == "pause" && i.target.contains("sim-0000")),
            "{:?}",
            f.interventions
        );
        assert!(f.commands > 0, "the agent was told");
        let (before, after) = f.hit_tokens_per_min.unwrap();
        assert!(after < before / 2.0, "{before} -> {after}");
    }

    #[test]
    fn fleet_time_and_wall_time_agree_both_ways() {
        let origin = 1_800_000_000_000;
        assert_eq!(fleet_ms(origin, 20.0, origin + 1_000), origin + 20_000);
        assert_eq!(wall_ms_of(origin, 20.0, origin + 20_000), origin + 1_000);
        // Before the origin fleet time stands at the origin, as the commander's clock does.
        assert_eq!(fleet_ms(origin, 20.0, origin - 5), origin);
    }
}
