//! `fleet-sim bench dashboard`: what the operator's surface costs on a large fleet. A real
//! commander tracks `--workers` simulated agents (heartbeats over NATS, a share of them
//! changing state every round). Measured on that commander:
//!
//! - the CPU it spends with no stream client, then with `--clients` clients reading
//!   `/v1/stream` (1 Hz `fleet_snapshot` plus `agent_update`s), as a share of one core,
//!   and the difference (the fan-out's cost);
//! - first paint of the overview in headless Chromium (chromedriver): first contentful
//!   paint, and the moment the overview holds its figures (`overview-ready`);
//! - the embedded assets' size, raw and gzipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DashboardArgs {
    /// Simulated agents the commander tracks.
    #[arg(long, default_value_t = 10_000)]
    workers: usize,
    /// Stream clients for the fan-out figure.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds each CPU measurement lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Share of agents that change state each heartbeat round (agent_update events).
    #[arg(long, default_value_t = 0.02)]
    churn: f64,
    /// chromedriver for the first-paint figure (skipped when it cannot start).
    #[arg(long, default_value = "chromedriver")]
    chromedriver: String,
    /// The commander binary (default: next to this one).
    #[arg(long)]
    commander_bin: Option<std::path::PathBuf>,
}

/// CPU seconds (user + system) the process has used.
pub fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux for /proc/<pid>/stat.
    Some(ticks / 100.0)
}

/// The machine's CPU time so far as (busy, total) ticks, from `/proc/stat`: two readings
/// give the share of the machine that was busy between them.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal; the guest fields after them are
    // already counted in user and nice.
    let total: u64 = f.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// The share of the machine busy between two [`machine_ticks`] readings, in percent.
pub fn busy_percent(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|t| *t > 0)?;
    Some(after.0.saturating_sub(before.0) as f64 * 100.0 / total as f64)
}

async fn heartbeats(client: async_nats::Client, workers: usize, churn: f64) {
    let started = fleet_worker::message::now_rfc3339();
    let changing = ((workers as f64) * churn).ceil() as usize;
    for round in 0u64.. {
        let t = Instant::now();
        for w in 0..workers {
            // The first `changing` agents flip between active and idle each round.
            let active = if w < changing {
                round % 2 == 0
            } else {
                w % 3 == 0
            };
            let model = [
                "gpt-4o-mini",
                "claude-haiku-4-5",
                "gpt-4o",
                "gemini-2.0-flash",
            ][w % 4];
            let hb = serde_json::json!({"schema": 1, "worker_id": format!("sim-{w}"),
                "pool": format!("pool{}", w % 8),
                "state": if active { "active" } else { "idle" },
                "model": model,
                "current_tasks": if active { vec![format!("t-{w}-{round}")] } else { vec![] },
                "max_in_flight": 4, "context_tokens": 10_000 + (w as u64 % 50) * 1000,
                "completed": round, "failed": 0,
                "started_at": started, "sent_at": fleet_worker::message::now_rfc3339()});
            let mut h = async_nats::HeaderMap::new();
            h.insert("Fleet-Kind", "heartbeat");
            let _ = client
                .publish_with_headers(
                    format!("fleet.telemetry.pool{}.sim-{w}", w % 8),
                    h,
                    hb.to_string().into(),
                )
                .await;
        }
        let _ = client.flush().await;
        tokio::time::sleep(Duration::from_secs(5).saturating_sub(t.elapsed())).await;
    }
}

async fn measure(pid: u32, seconds: u64) -> Result<f64, String> {
    let a = cpu_s(pid).ok_or("cannot read /proc")?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let b = cpu_s(pid).ok_or("cannot read /proc")?;
    Ok((b - a) / t.elapsed().as_secs_f64())
}

/// A stream client that reads everything and counts events and bytes.
async fn reader(url: String, events: Arc<AtomicU64>, bytes: Arc<AtomicU64>) {
    let Ok(mut r) = reqwest::get(&url).await else {
        return;
    };
    while let Ok(Some(chunk)) = r.chunk().await {
        bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let n = chunk.windows(2).filter(|w| w == b"\n\n").count();
        events.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// First contentful paint and `overview-ready` of the dashboard, in ms from navigation.
async fn first_paint(chromedriver: &str, url: &str) -> Result<(f64, f64), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut child = std::process::Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{chromedriver}: {e}"))?;
    let result = async {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        let c = fantoccini::ClientBuilder::native()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| e.to_string())?;
        // Once to warm the browser's own start-up, then measured.
        let mut out = (0.0, 0.0);
        for _ in 0..2 {
            c.goto("about:blank").await.map_err(|e| e.to_string())?;
            c.goto(url).await.map_err(|e| e.to_string())?;
            let mut ready = serde_json::Value::Null;
            for _ in 0..200 {
                ready = c
                    .execute(
                        "const r = performance.getEntriesByName('overview-ready')[0]; \
                         const p = performance.getEntriesByName('first-contentful-paint')[0]; \
                         return r ? [p ? p.startTime : null, r.startTime] : null;",
                        vec![],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                if !ready.is_null() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            out = (
                ready[0].as_f64().unwrap_or(f64::NAN),
                ready[1].as_f64().ok_or("the overview never became ready")?,
            );
        }
        let _ = c.close().await;
        Ok::<_, String>(out)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[expect(
    clippy::print_stdout,
    reason = "the figures on stdout are what the benchmark is for"
)]
pub async fn run(args: DashboardArgs) -> Result<(), String> {
    let fleet = super::simulated_fleet(
        args.commander_bin.clone(),
        args.workers,
        "max_queue_depth = 100\n",
    )?;
    let (server, cmd, pid) = (&fleet.server, &fleet.commander, fleet.pid);
    let client = async_nats::connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    let hb = tokio::spawn(heartbeats(client, args.workers, args.churn));
    let http = cmd.http().to_string();
    // Until every agent is in the snapshot.
    let t = Instant::now();
    loop {
        let n = reqwest::get(format!("{http}/v1/workers?limit=1"))
            .await
            .map_err(|e| e.to_string())?
            .json::<serde_json::Value>()
            .await
            .map_err(|e| e.to_string())?["total"]
            .as_u64()
            .unwrap_or(0);
        if n as usize >= args.workers {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {n} of {} agents tracked", args.workers));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "dashboard bench: {} simulated agents ({} % change state every 5 s), {} stream clients, {} s per measurement",
        args.workers,
        args.churn * 100.0,
        args.clients,
        args.seconds
    );

    match first_paint(&args.chromedriver, &format!("{http}/#/overview")).await {
        Ok((fcp, ready)) => println!(
            "first paint of the overview: first contentful paint {fcp:.0} ms, figures in place (overview-ready) {ready:.0} ms"
        ),
        Err(e) => println!("first paint: skipped ({e})"),
    }

    let idle = measure(pid, args.seconds).await?;
    println!(
        "commander CPU: {:.1} % of a core with no stream client",
        idle * 100.0
    );
    // What the overview page asks for, then every kind (every agent's updates too).
    for kinds in ["alert,fleet_snapshot", ""] {
        let (events, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let readers: Vec<_> = (0..args.clients)
            .map(|_| {
                tokio::spawn(reader(
                    format!("{http}/v1/stream?kinds={kinds}"),
                    events.clone(),
                    bytes.clone(),
                ))
            })
            .collect();
        // Let every client connect and the feed start before measuring.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (e0, b0) = (
            events.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        );
        let t = Instant::now();
        let with = measure(pid, args.seconds).await?;
        let secs = t.elapsed().as_secs_f64();
        let (e1, b1) = (
            events.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        );
        let per_client = (e1 - e0) as f64 / secs / args.clients.max(1) as f64;
        let kib = (b1 - b0) as f64 / secs / args.clients.max(1) as f64 / 1024.0;
        println!(
            "stream fan-out, kinds {:?}: commander {:.1} % of a core, {:.2} % more than with no client, for {} clients ({:.1} events/s and {:.1} KiB/s each) (goal <= 5 %)",
            if kinds.is_empty() { "all" } else { kinds },
            with * 100.0,
            (with - idle) * 100.0,
            args.clients,
            per_client,
            kib
        );
        for r in readers {
            r.abort();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    hb.abort();

    let (mut raw, mut gz) = (0, 0);
    for (name, r, z) in fleet_commander::api::console::sizes() {
        println!("asset {name}: {r} bytes, {z} gzipped");
        raw += r;
        gz += z;
    }
    println!(
        "embedded assets: {raw} bytes, {gz} gzipped (served gzipped to browsers that accept it)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_percent_is_the_busy_share_of_the_ticks_between_two_readings() {
        assert_eq!(busy_percent((10, 100), (60, 200)), Some(50.0));
        assert_eq!(busy_percent((10, 100), (110, 200)), Some(100.0));
        // No time between the readings, or a counter that went back: no figure.
        assert_eq!(busy_percent((10, 100), (10, 100)), None);
        assert_eq!(busy_percent((10, 100), (5, 90)), None);
    }

    #[test]
    fn machine_ticks_reads_this_machine() {
        let (busy, total) = machine_ticks().expect("/proc/stat has a cpu line");
        assert!(total > 0 && busy <= total, "busy {busy} of {total}");
        let later = machine_ticks().expect("/proc/stat has a cpu line");
        assert!(later.1 >= total);
    }
}
