//! `fleet-sim report`: the lab's report, `simulations/reports/<date>/report.md` with SVG
//! plots beside it.
//!
//! - Detection quality, in process (the commander's decode path, live state and detector
//!   on a simulated clock, `lab::run`): every fault class `--runs` times and the healthy
//!   hour `--healthy-runs` times, on seeds from `--seed`, spread over the machine's cores.
//! - The same scenarios on the real stack (`lab::stack`): nats-server, the commander
//!   binary with compressed time, the agents over NATS and OTLP/HTTP; what fired, what the
//!   escalation ladder did and its effect, and the fleet's cost over time.
//! - The commander's CPU and memory with `--big-agents` agents on the stack.
//! - Routing economics (`lab::economics`) and the τ-bench replay (`lab::tau`).
//! - Tail sampling on the trace bench's mix (`bench::traces`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::stack::{self, StackFigures, StackOptions};
use super::{Outcome, SCENARIOS, Scenario, quantile, wilson};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Agents per in-process run.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Runs per fault class (59 runs that all detect bound the power above 95 % with 95 %
    /// confidence).
    #[arg(long, default_value_t = 59)]
    runs: u64,
    /// Healthy runs (299 without a false alarm bound the false-alarm rate below 1 % per run
    /// with 95 % confidence).
    #[arg(long, default_value_t = 299)]
    healthy_runs: u64,
    /// Seed of the first run; run k uses seed + k.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Agents of each scenario's run on the real stack (0: no stack runs).
    #[arg(long, default_value_t = 1000)]
    stack_agents: usize,
    /// Fleet seconds per wall second on the stack.
    #[arg(long, default_value_t = 10.0)]
    speed: f64,
    /// The scenarios run on the stack, by name, comma-separated (default: every one the
    /// stack can run).
    #[arg(long, value_delimiter = ',')]
    stack_scenarios: Vec<String>,
    /// Agents of the stack run whose commander CPU and memory the report gives (0: none).
    #[arg(long, default_value_t = 10_000)]
    big_agents: usize,
    /// Fleet minutes of that run (at `--big-speed`).
    #[arg(long, default_value_t = 5)]
    big_minutes: u64,
    /// Its speed: 10,000 agents are as many messages as a 2-core machine carries at 1×.
    #[arg(long, default_value_t = 1.0)]
    big_speed: f64,
    /// The commander binary (default: beside this one).
    #[arg(long)]
    commander: Option<PathBuf>,
    /// The policy directory of the stack runs (the lab's escalation ladder).
    #[arg(long, default_value = "simulations/lab-policies")]
    policy_dir: PathBuf,
    /// The τ-bench trajectories.
    #[arg(long, default_value_os_t = super::tau::default_path())]
    tau: PathBuf,
    /// Replays of the τ-bench runs split at random, the control for the cohort replay.
    #[arg(long, default_value_t = 20)]
    tau_controls: usize,
    /// Tasks of the routing-economics mix.
    #[arg(long, default_value_t = 10_000)]
    mix_tasks: u64,
    /// Where the report goes (default `simulations/reports/<today>`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One fault class's figures over its runs.
#[derive(Clone, Debug)]
struct ClassFigures {
    scenario: Scenario,
    runs: u64,
    detected: u64,
    /// Seconds from onset to detection, sorted.
    ttd: Vec<u64>,
    /// Alerts before the onset, and the fleet hours before it.
    false_alarms: u64,
    clean_hours: f64,
    /// Runs with any alert before the onset.
    runs_with_false_alarm: u64,
    /// One alert message that detected it.
    message: Option<String>,
    /// Detections by `stuck_agent`: ms past the threshold when it fired, sorted.
    past_threshold_ms: Vec<u64>,
    rules: BTreeMap<&'static str, u64>,
}

fn figures_of(s: Scenario, outcomes: &[Outcome]) -> ClassFigures {
    let mut ttd: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| o.detection.as_ref().map(|(_, t)| *t))
        .collect();
    ttd.sort_unstable();
    let clean_min = if s.fault.is_some() {
        s.onset_min
    } else {
        s.minutes
    };
    let mut rules = BTreeMap::new();
    for o in outcomes {
        for a in &o.false_alarms {
            *rules.entry(a.rule.as_str()).or_default() += 1;
        }
    }
    ClassFigures {
        scenario: s,
        runs: outcomes.len() as u64,
        detected: ttd.len() as u64,
        ttd,
        false_alarms: outcomes.iter().map(|o| o.false_alarms.len() as u64).sum(),
        clean_hours: outcomes.len() as f64 * clean_min as f64 / 60.0,
        runs_with_false_alarm: outcomes
            .iter()
            .filter(|o| !o.false_alarms.is_empty())
            .count() as u64,
        message: outcomes
            .iter()
            .find_map(|o| o.detection.as_ref().map(|(a, _)| a.message.clone())),
        past_threshold_ms: {
            let mut v: Vec<u64> = outcomes
                .iter()
                .filter_map(|o| o.detection.as_ref()?.0.past_threshold_ms)
                .collect();
            v.sort_unstable();
            v
        },
        rules,
    }
}

/// What the stack runs gave, by scenario.
type StackRuns = Vec<(Scenario, Result<(Outcome, StackFigures), String>)>;

/// Every scenario in process: `--runs` of each fault, `--healthy-runs` of the healthy hour.
#[expect(clippy::print_stderr, reason = "progress of a long command")]
fn in_process_classes(
    args: &ReportArgs,
    spec: &fleet_commander::policy::schema::AlertSpec,
) -> Result<Vec<ClassFigures>, String> {
    let mut classes = Vec::new();
    for s in SCENARIOS {
        let n = if s.fault.is_some() {
            args.runs
        } else {
            args.healthy_runs
        };
        let t = std::time::Instant::now();
        let outcomes = super::runs_of(s, args.agents, args.seed, n, spec)?;
        let f = figures_of(s, &outcomes);
        eprintln!(
            "{:<22} {}/{} detected, {} runs with a false alarm ({:.0} s)",
            s.name,
            f.detected,
            f.runs,
            f.runs_with_false_alarm,
            t.elapsed().as_secs_f64()
        );
        classes.push(f);
    }

    Ok(classes)
}

/// One run of each chosen scenario the stack can run.
#[expect(clippy::print_stderr, reason = "progress of a long command")]
async fn stack_runs(args: &ReportArgs, opts: &StackOptions) -> StackRuns {
    let mut stack_runs: StackRuns = Vec::new();
    if args.stack_agents > 0 {
        for s in SCENARIOS {
            let chosen =
                args.stack_scenarios.is_empty() || args.stack_scenarios.iter().any(|n| n == s.name);
            if stack::unsupported(s.fault).is_some() || !chosen {
                continue;
            }
            let r = stack::run(s, args.stack_agents, args.seed, opts).await;
            match &r {
                Ok((o, f)) => eprintln!(
                    "stack {:<16} detected {:?}, {} false alarms, lag {} ms, CPU {:.0} %",
                    s.name,
                    o.detection.as_ref().map(|(a, t)| (a.rule.as_str(), *t)),
                    o.false_alarms.len(),
                    f.max_lag_ms,
                    f.cpu_pct
                ),
                Err(e) => eprintln!("stack {}: {e}", s.name),
            }
            stack_runs.push((s, r));
        }
    }
    stack_runs
}

/// The budget overrun on the stack, when stack runs are asked for and it is chosen.
#[expect(clippy::print_stderr, reason = "progress of a long command")]
async fn budget_run(args: &ReportArgs) -> Option<Result<super::budget::BudgetOutcome, String>> {
    let budget_chosen = args.stack_scenarios.is_empty()
        || args
            .stack_scenarios
            .iter()
            .any(|n| n == super::BUDGET_OVERRUN);
    if args.stack_agents > 0 && budget_chosen {
        let r = super::budget::run(&super::budget::BudgetOptions {
            speed: args.speed,
            bin: args.commander.clone(),
            seed: args.seed,
            ..Default::default()
        })
        .await;
        eprintln!(
            "stack budget_overrun: {:?}",
            r.as_ref().map(|o| (o.passed(), &o.alert, o.lost))
        );
        Some(r)
    } else {
        None
    }
}

/// The stack runs come after the in-process hour and a half, so what they need is checked
/// first: a missing nats-server or commander fails the command at once, not in the report.
fn stack_ready(args: &ReportArgs) -> Result<(), String> {
    if args.stack_agents == 0 && args.big_agents == 0 {
        return Ok(());
    }
    let alone = "or pass --stack-agents 0 --big-agents 0 for the in-process part alone";
    fleet_testkit::nats_server_present(&fleet_testkit::nats_server_bin())
        .map_err(|e| format!("the stack runs need nats-server: {e}; {alone}"))?;
    let bin = args
        .commander
        .clone()
        .unwrap_or_else(fleet_testkit::commander_bin);
    if !bin.is_file() {
        return Err(format!(
            "the stack runs need the commander binary, not found at {} (build it with `cargo build --release -p fleet-commander`, or pass --commander); {alone}",
            bin.display()
        ));
    }
    Ok(())
}

#[expect(clippy::print_stderr, reason = "progress of a long command")]
pub async fn main(args: ReportArgs) -> Result<(), String> {
    let day = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("simulations/reports").join(&day[..10]));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    let policy_dir = Some(args.policy_dir.as_path()).filter(|p| p.is_dir());
    let spec = super::alert_spec(policy_dir)?;
    stack_ready(&args)?;
    let classes = in_process_classes(&args, &spec)?;
    let opts = StackOptions {
        speed: args.speed,
        bin: args.commander.clone(),
        policy_dir: Some(args.policy_dir.clone()).filter(|p| p.is_dir()),
    };
    let stack_runs = stack_runs(&args, &opts).await;
    let budget = budget_run(&args).await;
    let big = if args.big_agents > 0 {
        let healthy = SCENARIOS[SCENARIOS.len() - 1];
        let s = Scenario {
            minutes: args.big_minutes,
            ..healthy
        };
        let big_opts = StackOptions {
            speed: args.big_speed,
            ..opts.clone()
        };
        let r = stack::run(s, args.big_agents, args.seed, &big_opts).await;
        eprintln!(
            "stack {} agents: {:?}",
            args.big_agents,
            r.as_ref().map(|(_, f)| (f.cpu_pct, f.rss_peak_mib))
        );
        Some(r)
    } else {
        None
    };
    let economics = super::economics::run(args.mix_tasks, args.seed)?;
    let tau = super::tau::run(&args.tau, args.tau_controls, args.seed, &spec);
    let sampling = crate::bench::traces::measure(&crate::bench::traces::TracesArgs::default())?;

    plot_power(&out.join("power_vs_false_alarms.svg"), &classes)?;
    plot_ttd(&out.join("time_to_detect.svg"), &classes)?;
    let cost_plot = stack_runs
        .iter()
        .find(|(s, r)| s.name == "cost_runaway" && r.is_ok())
        .and_then(|(s, r)| r.as_ref().ok().map(|(o, f)| (s, o, f)));
    if let Some((s, o, f)) = cost_plot {
        plot_cost(&out.join("fleet_cost.svg"), s, o, f)?;
    }
    let text = write_report(&Inputs {
        args: &args,
        classes: &classes,
        stack_runs: &stack_runs,
        big: big.as_ref(),
        budget: budget.as_ref(),
        economics: &economics,
        tau: &tau,
        sampling: &sampling,
        cost_plot: cost_plot.is_some(),
    });
    let path = out.join("report.md");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("report: {}", path.display());
    Ok(())
}

struct Inputs<'a> {
    args: &'a ReportArgs,
    classes: &'a [ClassFigures],
    stack_runs: &'a StackRuns,
    big: Option<&'a Result<(Outcome, StackFigures), String>>,
    budget: Option<&'a Result<super::budget::BudgetOutcome, String>>,
    economics: &'a super::economics::Economics,
    tau: &'a Result<super::tau::TauReport, String>,
    sampling: &'a crate::bench::traces::StorageFigures,
    cost_plot: bool,
}

fn pct(k: u64, n: u64) -> String {
    let (lo, hi) = wilson(k, n);
    format!(
        "{k}/{n} ({:.1} %, 95 % CI {:.1}–{:.1} %)",
        k as f64 * 100.0 / n.max(1) as f64,
        lo * 100.0,
        hi * 100.0
    )
}

fn write_report(i: &Inputs<'_>) -> String {
    let mut r = String::new();
    let a = i.args;
    let _ = writeln!(r, "# Fleet commander lab report\n");
    let _ = writeln!(
        r,
        "Produced by `fleet-sim report --agents {} --runs {} --healthy-runs {} --seed {} --stack-agents {} --speed {} --big-agents {}` on {}.\n",
        a.agents,
        a.runs,
        a.healthy_runs,
        a.seed,
        a.stack_agents,
        a.speed,
        a.big_agents,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    write_goals(&mut r, i);
    write_detection(&mut r, i);
    write_stack(&mut r, i);
    write_economics(&mut r, i.economics);
    write_tau(&mut r, i.tau);
    write_sampling(&mut r, i.sampling);
    r
}

fn healthy_of(classes: &[ClassFigures]) -> Option<&ClassFigures> {
    classes.iter().find(|c| c.scenario.fault.is_none())
}

fn write_goals(r: &mut String, i: &Inputs<'_>) {
    let _ = writeln!(r, "## Goals\n");
    let faulty: Vec<&ClassFigures> = i
        .classes
        .iter()
        .filter(|c| c.scenario.fault.is_some())
        .collect();
    let missed: Vec<String> = faulty
        .iter()
        .filter(|c| c.detected * 100 < c.runs * 95)
        .map(|c| format!("{} ({}/{})", c.scenario.name, c.detected, c.runs))
        .collect();
    let least_runs = faulty.iter().map(|c| c.runs).min().unwrap_or(0);
    // With no miss in n runs, the one-sided 95 % lower bound of the power is 0.05^(1/n).
    let bound = 0.05f64.powf(1.0 / least_runs.max(1) as f64);
    let _ = writeln!(
        r,
        "- **Power ≥ 95 % for every fault class.** {}",
        if !missed.is_empty() {
            format!("Missed by {}.", missed.join(", "))
        } else if faulty.iter().all(|c| c.detected == c.runs) {
            format!(
                "Met: every run of every class detected its fault. With no miss in {least_runs} runs the power is above {:.1} % with 95 % confidence{}.",
                bound * 100.0,
                if bound >= 0.95 {
                    ""
                } else {
                    " (59 runs per class are what it takes to say 95 %)"
                }
            )
        } else {
            "Met on every class's point estimate; the table gives the classes with a miss and their intervals.".to_string()
        }
    );
    if let Some(Ok(b)) = i.budget {
        let _ = writeln!(
            r,
            "  The budget overrun runs on the stack only, once (below): {}.",
            if b.passed() {
                "detected, the limit held and nothing was lost"
            } else {
                "**it did not pass** (see its section)"
            }
        );
    }
    if let Some(h) = healthy_of(i.classes) {
        let _ = writeln!(
            r,
            "- **≤ 1 false alarm per 100 healthy runs.** {} healthy runs of {} minutes had a false alarm: {}. {}",
            h.runs_with_false_alarm,
            h.scenario.minutes,
            pct(h.runs_with_false_alarm, h.runs),
            match (
                h.runs_with_false_alarm * 100 <= h.runs,
                h.runs_with_false_alarm == 0 && h.runs >= 299
            ) {
                (true, true) =>
                    "Met, and with none in 299 or more runs the rate is below 1 % with 95 % confidence.",
                (true, false) => "Met on the point estimate.",
                _ => "Missed.",
            }
        );
    }
    if let Some(c) = i.classes.iter().find(|c| c.scenario.name == "stuck_agent") {
        let worst = c.past_threshold_ms.last().copied();
        let _ = writeln!(
            r,
            "- **Stuck agents within one heartbeat (5 s) past their threshold.** A stuck agent's run goes silent at the onset; the alert is due once the silence passes `active_duration_multiple` (3) × the run's expected duration, its task type's median duration over the hour as the commander has it at that second (the threshold moves with that median). When it fired, the silence had been past the threshold in force for median {} ms, at worst {} ms over {} detections. {}",
            quantile(&c.past_threshold_ms, 0.5).map_or("-".into(), |v| v.to_string()),
            worst.map_or("-".into(), |v| v.to_string()),
            c.past_threshold_ms.len(),
            match worst {
                Some(w) if w <= 5_000 && c.detected == c.runs => "Met.",
                _ => "Missed.",
            }
        );
    }
    let ratio = i.economics.ratio();
    let _ = writeln!(
        r,
        "- **Routing cost ≤ 40 % of always-frontier.** {:.1} % ({}). \n",
        ratio * 100.0,
        if ratio <= 0.4 { "Met" } else { "Missed" }
    );
}

fn write_detection(r: &mut String, i: &Inputs<'_>) {
    let _ = writeln!(
        r,
        "## Detection quality (in process, {} agents)\n\nEach run feeds the simulated fleet's OTLP exports and heartbeats through the commander's decode path into its live state and detector, on a simulated clock, with the built-in policy's `[alerts]`. A detection is one of the class's expected rules firing after the onset; a false alarm is any alert before it (any alert at all in a healthy run). Fleet-hours count the minutes before the onset.\n",
        i.args.agents
    );
    let _ = writeln!(
        r,
        "| class | onset / length (min) | power | time to detect median / p95 (s) | runs with a false alarm | false alarms per fleet-hour |\n|---|---|---|---|---|---|"
    );
    for c in i.classes {
        let power = if c.scenario.fault.is_some() {
            pct(c.detected, c.runs)
        } else {
            "(no fault)".into()
        };
        let ttd = format!(
            "{} / {}",
            quantile(&c.ttd, 0.5).map_or("-".into(), |v| v.to_string()),
            quantile(&c.ttd, 0.95).map_or("-".into(), |v| v.to_string())
        );
        let _ = writeln!(
            r,
            "| {} | {} / {} | {} | {} | {} | {:.3} |",
            c.scenario.name,
            c.scenario.onset_min,
            c.scenario.minutes,
            power,
            ttd,
            pct(c.runs_with_false_alarm, c.runs),
            c.false_alarms as f64 / c.clean_hours.max(1e-9)
        );
    }
    let _ = writeln!(
        r,
        "\n![power against false alarms](power_vs_false_alarms.svg)\n\n![time to detect](time_to_detect.svg)\n"
    );
    let _ = writeln!(r, "What fired, per class (one message each):\n");
    for c in i.classes.iter().filter(|c| c.scenario.fault.is_some()) {
        let _ = writeln!(
            r,
            "- `{}`: {}",
            c.scenario.name,
            c.message.as_deref().unwrap_or("(nothing)")
        );
    }
    let false_rules: BTreeMap<&str, u64> =
        i.classes
            .iter()
            .flat_map(|c| c.rules.iter())
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(*k).or_default() += v;
                m
            });
    if !false_rules.is_empty() {
        let list: Vec<String> = false_rules
            .iter()
            .map(|(k, v)| format!("`{k}` {v}"))
            .collect();
        let _ = writeln!(r, "\nFalse alarms by rule: {}.", list.join(", "));
    }
    let _ = writeln!(r);
}

fn write_stack(r: &mut String, i: &Inputs<'_>) {
    let a = i.args;
    let _ = writeln!(
        r,
        "## On the real stack ({} agents, fleet time at {}×)\n\nA private nats-server and the `commander` binary with `[clock] speed = {}`; heartbeats over NATS, spans of even agents over NATS and of odd agents over OTLP/HTTP; alerts read from `fleet.alerts.>`; the agents obey the control commands of the escalation ladder in `{}`. One run per scenario (seed {}).\n",
        a.stack_agents,
        a.speed,
        a.speed,
        a.policy_dir.display(),
        a.seed
    );
    if i.stack_runs.is_empty() {
        let _ = writeln!(r, "(not run: `--stack-agents 0`)\n");
    } else {
        let _ = writeln!(
            r,
            "| scenario | detected (s after onset) | false alarms | interventions | hit agents' tokens/min before → after | commander CPU | peak RSS | lab lag (worst) |\n|---|---|---|---|---|---|---|---|"
        );
        for (s, res) in i.stack_runs {
            match res {
                Ok((o, f)) => {
                    let det = o.detection.as_ref().map_or("**no**".to_string(), |(d, t)| {
                        format!("`{}` +{t}", d.rule.as_str())
                    });
                    let ints: Vec<String> = f
                        .interventions
                        .iter()
                        .take(3)
                        .map(|x| format!("{} {} ({}, {})", x.action, x.target, x.rule, x.outcome))
                        .collect();
                    let _ = writeln!(
                        r,
                        "| {} | {} | {} | {} | {} | {:.0} % | {:.0} MiB | {} ms |",
                        s.name,
                        det,
                        o.false_alarms.len(),
                        if ints.is_empty() {
                            "none".to_string()
                        } else {
                            ints.join("; ")
                        },
                        f.hit_tokens_per_min
                            .map_or("-".into(), |(b, af)| format!("{b:.0} → {af:.0}")),
                        f.cpu_pct,
                        f.rss_peak_mib,
                        f.max_lag_ms
                    );
                }
                Err(e) => {
                    let _ = writeln!(r, "| {} | error: {e} | | | | | | |", s.name);
                }
            }
        }
        let skipped: Vec<String> = SCENARIOS
            .iter()
            .filter_map(|s| stack::unsupported(s.fault).map(|why| format!("`{}` ({why})", s.name)))
            .collect();
        let _ = writeln!(r, "\nIn process only: {}.\n", skipped.join(", "));
    }
    if i.cost_plot {
        let _ = writeln!(
            r,
            "![fleet cost over time, cost runaway](fleet_cost.svg)\n\nThe fleet's burn rate as the commander reported it (`GET /v1/fleet`) through the cost-runaway run: the onset (grey), the alerts (red) and the interventions (blue).\n"
        );
    }
    write_budget(r, i);
    match i.big {
        Some(Ok((o, f))) => {
            let _ = writeln!(
                r,
                "**{} agents** on the stack for {} fleet minutes at {}×: commander CPU {:.0} % of one core on average, peak RSS {:.0} MiB; {} spans and {} heartbeats sent; the lab stepped at worst {} ms late; {} alerts.\n",
                o.agents,
                o.scenario.minutes,
                a.big_speed,
                f.cpu_pct,
                f.rss_peak_mib,
                o.spans,
                o.heartbeats,
                f.max_lag_ms,
                o.fired.len()
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(r, "The {}-agent run failed: {e}\n", a.big_agents);
        }
        None => {}
    }
}

/// The budget overrun: on the stack only, with real tasks (`lab/budget.rs`).
fn write_budget(r: &mut String, i: &Inputs<'_>) {
    let Some(res) = i.budget else {
        return;
    };
    let _ = writeln!(
        r,
        "**Budget overrun** (`budget_overrun`, on the stack only: budgets act on real tasks, so this run has a producer submitting tasks of team `search` and two SDK workers taking them; `lab/budget.rs`). A rolling-hour budget, soft alert at 80 %, defer at 100 %, with a limit of twice the healthy hour's spend; after 30 healthy fleet minutes the team's arrivals multiply by 8 (a runaway batch job). One run (seed {}): the notice is arithmetic on the ledger, so what a run shows is how soon after the crossing it comes, whether the limit holds and whether anything is lost.
",
        i.args.seed
    );
    match res {
        Ok(o) => {
            let _ = writeln!(
                r,
                "- Detected: {}. The submitted tasks' estimates passed 80 % of the limit {} s after the onset.
- Before the onset: {} notices (false alarms).
- Intervention: the first task was stored deferred {} s after the onset. Spending under the budget ended at ${:.2} of ${:.2}; without the budget the accepted tasks would have cost ${:.2}, so ${:.2} was held back.
- Tasks: {} accepted before the onset and {} after; {} completed, {} stored deferred, **{} lost**. A deferred task's record says: \"{}\".
- Commander peak RSS {:.0} MiB.
",
                o.alert.as_ref().map_or("**no**".to_string(), |(s, m)| format!("`budget_soft_threshold` +{s} s: \"{m}\"")),
                o.crossed_s.map_or("-".into(), |s| s.to_string()),
                o.alerts_before,
                o.first_deferral_s.map_or("-".into(), |s| s.to_string()),
                o.committed_usd,
                o.limit_usd,
                o.unchecked_usd,
                (o.unchecked_usd - o.committed_usd).max(0.0),
                o.accepted_before,
                o.accepted_after,
                o.completed,
                o.deferred,
                o.lost,
                o.deferred_reason.as_deref().unwrap_or("-"),
                o.rss_peak_mib
            );
        }
        Err(e) => {
            let _ = writeln!(
                r,
                "The budget run failed: {e}
"
            );
        }
    }
}

fn write_economics(r: &mut String, e: &super::economics::Economics) {
    let tiers: Vec<String> = e.tiers.iter().map(|(t, n)| format!("{t} {n}")).collect();
    let _ = writeln!(
        r,
        "## Routing economics\n\n{} tasks (seed {}; tiers: {}), routed by `route::decide` over the default rubric and the built-in registry's prices (`lab/economics.rs` says how the mix is drawn).\n",
        e.tasks,
        e.seed,
        tiers.join(", ")
    );
    let _ = writeln!(
        r,
        "| serving | cost (USD) | vs frontier | tasks at or above their tier |\n|---|---|---|---|"
    );
    for (name, s) in [
        ("the commander's routing".to_string(), &e.routed),
        (
            format!("always {} (frontier)", e.frontier_model),
            &e.frontier,
        ),
        (
            format!("always {} (cheapest)", e.cheapest_model),
            &e.cheapest,
        ),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {:.2} | {:.1} % | {} |",
            s.usd,
            100.0 * s.usd / e.frontier.usd.max(1e-12),
            pct(s.at_tier, e.tasks)
        );
    }
    let models: Vec<String> = e
        .routed
        .by_model
        .iter()
        .map(|(m, (n, usd))| format!("{m} {n} tasks (${usd:.2})"))
        .collect();
    let _ = writeln!(r, "\nRouted to: {}.\n", models.join(", "));
}

fn write_tau(r: &mut String, t: &Result<super::tau::TauReport, String>) {
    let _ = writeln!(r, "## τ-bench replay\n");
    let t = match t {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(r, "Not run: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        r,
        "{} real runs of a tool-calling airline agent ({} passed), replayed as GenAI traces (`lab/tau.rs`: a 2 s chat span per assistant turn, a 1 s tool span per call, tokens = characters / 4, a tool answer starting `Error` is a failed call): the {} passing runs over the first 45 minutes of an hour, the failing runs over the last 15, through the commander's live state and detector.\n",
        t.runs, t.passed, t.passed
    );
    let _ = writeln!(r, "The replay sent {} spans.\n", t.cohorts.spans);
    if t.cohorts.fired.is_empty() {
        let _ = writeln!(r, "Nothing fired.\n");
    }
    for f in &t.cohorts.fired {
        let _ = writeln!(
            r,
            "- minute {}: `{}` {:?}: {}",
            f.at_s / 60,
            f.rule.as_str(),
            f.labels,
            f.message
        );
    }
    let n = t.controls.len() as u64;
    let drift = t.controls.iter().filter(|c| c.0).count() as u64;
    let slice = t.controls.iter().filter(|c| c.1).count() as u64;
    let _ = writeln!(
        r,
        "\nControl: the same runs split at random into groups of the same sizes, {n} times: behaviour drift fired in {}, a failure slice in {}.\n",
        pct(drift, n),
        pct(slice, n)
    );
}

fn write_sampling(r: &mut String, s: &crate::bench::traces::StorageFigures) {
    let _ = writeln!(
        r,
        "## Tail sampling\n\nThe trace bench's mix (`fleet-sim bench traces`: {} runs, 5 % failing, a long cost tail, two agents flagged) through a real trace keeper under the built-in policy (10 % healthy sample):\n\n- spans kept: {:.1} %; bytes stored: {:.1} % of keeping everything (a cut of {:.1} %);\n- kept: errors {}/{}, flagged {}/{}, above the hour's P99 cost or duration {}/{}.\n",
        s.runs,
        s.spans_kept_pct,
        100.0 - s.cut_pct,
        s.cut_pct,
        s.errors.0,
        s.errors.1,
        s.flagged.0,
        s.flagged.1,
        s.tail.0,
        s.tail.1
    );
}

fn plot_err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Per class: its power with the Wilson interval, and (in its label) its false alarms per
/// fleet-hour before the onset.
fn plot_power(path: &Path, classes: &[ClassFigures]) -> Result<(), String> {
    let rows: Vec<&ClassFigures> = classes
        .iter()
        .filter(|c| c.scenario.fault.is_some())
        .collect();
    let labels: Vec<String> = rows
        .iter()
        .map(|c| {
            format!(
                "{} ({:.2} FA/h)",
                c.scenario.name,
                c.false_alarms as f64 / c.clean_hours.max(1e-9)
            )
        })
        .collect();
    let height = 90 + 28 * rows.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Detection power per fault class (95 % Wilson interval) and false alarms per fleet-hour",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(250)
        .build_cartesian_2d(0f64..1.0f64, (0..rows.len()).into_segmented())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("power")
        .y_labels(rows.len())
        .y_label_formatter(&|v| segment_label(v, &labels))
        .draw()
        .map_err(plot_err)?;
    for (k, c) in rows.iter().enumerate() {
        let p = c.detected as f64 / c.runs.max(1) as f64;
        let (lo, hi) = wilson(c.detected, c.runs);
        let y = || SegmentValue::CenterOf(k);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(lo, y()), (hi, y())],
                BLUE.stroke_width(3),
            )))
            .map_err(plot_err)?;
        chart
            .draw_series(std::iter::once(Circle::new((p, y()), 5, BLACK.filled())))
            .map_err(plot_err)?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.95, SegmentValue::Exact(0)), (0.95, SegmentValue::Last)],
            RED.stroke_width(1),
        )))
        .map_err(plot_err)?
        .label("goal: 95 %")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleLeft)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)
}

/// The label of a row of a segmented axis.
fn segment_label(v: &SegmentValue<usize>, labels: &[String]) -> String {
    match v {
        SegmentValue::CenterOf(k) | SegmentValue::Exact(k) => {
            labels.get(*k).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    }
}

/// Time to detect per class: the 5th–95th percentile as a bar, the median as a dot.
fn plot_ttd(path: &Path, classes: &[ClassFigures]) -> Result<(), String> {
    let rows: Vec<&ClassFigures> = classes
        .iter()
        .filter(|c| c.scenario.fault.is_some() && !c.ttd.is_empty())
        .collect();
    let height = 90 + 28 * rows.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max_x = rows
        .iter()
        .filter_map(|c| c.ttd.last().copied())
        .max()
        .unwrap_or(60) as f64
        * 1.1;
    let names: Vec<String> = rows.iter().map(|c| c.scenario.name.to_string()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time to detect from the onset (5th–95th percentile, median)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d(0f64..max_x.max(1.0), (0..rows.len()).into_segmented())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_labels(rows.len())
        .y_label_formatter(&|v| segment_label(v, &names))
        .draw()
        .map_err(plot_err)?;
    for (k, c) in rows.iter().enumerate() {
        let y = || SegmentValue::CenterOf(k);
        let lo = quantile(&c.ttd, 0.05).unwrap_or(0) as f64;
        let hi = quantile(&c.ttd, 0.95).unwrap_or(0) as f64;
        let mid = quantile(&c.ttd, 0.5).unwrap_or(0) as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(lo, y()), (hi.max(lo + 0.5), y())],
                BLUE.stroke_width(6),
            )))
            .map_err(plot_err)?;
        chart
            .draw_series(std::iter::once(Circle::new((mid, y()), 5, BLACK.filled())))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)
}

/// The fleet's burn rate over a stack run, with the onset, alerts and interventions.
fn plot_cost(path: &Path, s: &Scenario, o: &Outcome, f: &StackFigures) -> Result<(), String> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max_y = f.burn.iter().map(|(_, b)| *b).fold(0.01, f64::max) * 1.15;
    let max_x = (s.minutes * 60) as f64 / 60.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Fleet burn rate, {} on the stack ({} agents)",
                s.name, o.agents
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("fleet minutes")
        .y_desc("USD per hour")
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(
            f.burn.iter().map(|(sec, b)| (*sec as f64 / 60.0, *b)),
            BLACK.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label("burn rate")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    let marker = |x: f64, color: RGBColor| {
        PathElement::new(vec![(x, 0.0), (x, max_y)], color.stroke_width(1))
    };
    chart
        .draw_series(std::iter::once(marker(
            s.onset_min as f64,
            RGBColor(150, 150, 150),
        )))
        .map_err(plot_err)?
        .label("onset")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    chart
        .draw_series(o.fired.iter().map(|a| marker(a.at_s as f64 / 60.0, RED)))
        .map_err(plot_err)?
        .label("alert")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(
            f.interventions
                .iter()
                .map(|x| marker(x.at_s as f64 / 60.0, BLUE)),
        )
        .map_err(plot_err)?
        .label("intervention")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)
}
