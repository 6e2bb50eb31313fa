//! `commander ctl …`: the control plane from a shell, over `POST /v1/control` (and the
//! audit and state over GET). Prints the ack; exits non-zero when a command is refused.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub command: CtlCommand,
    /// The commander's API.
    #[arg(
        long,
        global = true,
        env = "FLEET_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// Environment variable holding an operator's token (a viewer's for `audit` and
    /// `state`); unset in local mode.
    #[arg(long, global = true, default_value = "FLEET_TOKEN")]
    pub token_env: String,
    /// Who is acting, for the audit (`Fleet-Identity`).
    #[arg(long, global = true, env = "USER", default_value = "cli")]
    pub identity: String,
    /// Why, kept in the audit and on the intervention.
    #[arg(long, global = true)]
    pub reason: Option<String>,
}

/// A worker or a pool.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// One worker, by its id.
    #[arg(long)]
    worker: Option<String>,
    /// Every worker of a pool, those that join later included.
    #[arg(long)]
    pool: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Pull nothing new (a worker, or every worker of a pool) until resumed.
    Pause(Target),
    /// Finish what runs, then pull nothing new until resumed.
    Drain(Target),
    /// End the pauses and drains on a worker or pool.
    Resume(Target),
    /// Cancel a task that runs, or waits in its pool's queue, a budget's or a throttle's
    /// (its result is `cancelled`).
    Cancel {
        /// The task's id.
        #[arg(long)]
        task: String,
    },
    /// Cancel the tasks that wait in a pool's queue for a worker (up to 1,000 a time; the
    /// ack's `more` says to run it again). Running tasks go on.
    PurgePool {
        /// A configured pool.
        #[arg(long)]
        pool: String,
    },
    /// Refuse dispatch to a pool.
    BlockPool {
        /// A configured pool.
        #[arg(long)]
        pool: String,
    },
    /// Send a pool's tasks to another pool.
    ReroutePool {
        /// The pool whose tasks go elsewhere.
        #[arg(long)]
        pool: String,
        /// The pool they go to.
        #[arg(long)]
        to: String,
    },
    /// Weigh a pool in routing: its candidate scores are multiplied by `weight` (above 1
    /// it is chosen less, below 1 more).
    WeightPool {
        /// A configured pool.
        #[arg(long)]
        pool: String,
        /// 0.01-100; 1 is a pool's weight unless an operator set one.
        #[arg(long, value_parser = finite, allow_hyphen_values = true)]
        weight: f64,
    },
    /// End the blocks, reroutes and weight on a pool.
    RestorePool {
        /// A configured pool.
        #[arg(long)]
        pool: String,
    },
    /// The emergency cost cap: the fleet's spend limit per window, from now.
    CostCap {
        /// The fleet's limit in USD per window (0 defers every task with a cost).
        #[arg(long, value_parser = finite, allow_hyphen_values = true)]
        usd: f64,
        /// A rolling duration (`1h`, `30m`) or `hour`, `day`, `month`.
        #[arg(long, default_value = "1h")]
        window: String,
    },
    /// Lift the emergency cost cap.
    LiftCostCap,
    /// The newest control commands: who, what, when, result.
    Audit {
        /// How many, newest first (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// What operators have in force now.
    State,
}

/// A number the API can be sent: JSON has no NaN or infinity (serde_json writes them as
/// `null`, which the API would take for a missing value). Its range is the API's to check.
fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s:?} is not a finite number"))
    }
}

fn target(t: &Target) -> serde_json::Value {
    match (&t.worker, &t.pool) {
        (Some(w), _) => json!({"worker": w}),
        (_, Some(p)) => json!({"pool": p}),
        _ => json!({}),
    }
}

/// The command's JSON body, or the GET path it reads.
fn request(cmd: &CtlCommand) -> Result<serde_json::Value, String> {
    let with_target = |command: &str, t: &Target| {
        let mut b = target(t);
        b["command"] = json!(command);
        b
    };
    let body = match cmd {
        CtlCommand::Pause(t) => with_target("pause", t),
        CtlCommand::Drain(t) => with_target("drain", t),
        CtlCommand::Resume(t) => with_target("resume", t),
        CtlCommand::Cancel { task } => json!({"command": "cancel", "task_id": task}),
        CtlCommand::PurgePool { pool } => json!({"command": "purge_pool", "pool": pool}),
        CtlCommand::BlockPool { pool } => json!({"command": "block_pool", "pool": pool}),
        CtlCommand::ReroutePool { pool, to } => {
            json!({"command": "reroute_pool", "pool": pool, "to": to})
        }
        CtlCommand::WeightPool { pool, weight } => {
            json!({"command": "weight_pool", "pool": pool, "weight": weight})
        }
        CtlCommand::RestorePool { pool } => json!({"command": "restore_pool", "pool": pool}),
        CtlCommand::CostCap { usd, window } => {
            json!({"command": "cost_cap", "usd": usd, "window": window})
        }
        CtlCommand::LiftCostCap => json!({"command": "lift_cost_cap"}),
        CtlCommand::Audit { limit } => return Err(format!("/v1/control/audit?limit={limit}")),
        CtlCommand::State => return Err("/v1/control/state".into()),
    };
    Ok(body)
}

pub fn run(args: CtlArgs) -> ExitCode {
    super::run_async(tokio::runtime::Builder::new_current_thread(), send(args))
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the commander at {api}: {reason}")]
    Http { api: String, reason: String },
    #[error("refused ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("cannot write: {0}")]
    Write(#[from] std::io::Error),
}

async fn send(mut args: CtlArgs) -> Result<(), CtlError> {
    let api = args.api.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let mut req = match request(&args.command) {
        Ok(mut body) => {
            if let (Some(r), Some(b)) = (args.reason.take(), body.as_object_mut()) {
                b.insert("reason".into(), json!(r));
            }
            client
                .post(format!("{api}/v1/control"))
                .header("content-type", "application/json")
                .body(body.to_string())
        }
        Err(path) => client.get(format!("{api}{path}")),
    };
    if let Ok(t) = std::env::var(&args.token_env)
        && !t.trim().is_empty()
    {
        req = req.bearer_auth(t.trim());
    }
    let resp = req
        .header("fleet-identity", &args.identity)
        .send()
        .await
        .map_err(|e| CtlError::Http {
            api: api.clone(),
            reason: e.to_string(),
        })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let pretty =
        serde_json::from_str::<serde_json::Value>(&text).map_or(text.clone(), |v| format!("{v:#}"));
    if !status.is_success() {
        return Err(CtlError::Refused {
            status: status.as_u16(),
            body: pretty,
        });
    }
    writeln!(std::io::stdout().lock(), "{pretty}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::CtlCommand;

    fn parse(args: &[&str]) -> Result<CtlCommand, String> {
        let argv = ["commander", "ctl"].iter().chain(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Ctl(c) => Ok(c.command),
            other => Err(format!("{other:?}")),
        }
    }

    /// A weight or a cap JSON cannot carry is refused here, saying why; before, it went
    /// out as `null` and the API answered that the value was missing. A negative one
    /// reaches the API, which says what the range is.
    #[test]
    fn numbers_json_cannot_carry_are_refused_before_they_are_sent() {
        for bad in ["NaN", "inf", "-inf", "1e400"] {
            for args in [
                ["weight-pool", "--pool", "code", "--weight", bad],
                ["cost-cap", "--usd", bad, "--window", "1h"],
            ] {
                let e = parse(&args).unwrap_err();
                assert!(e.contains("finite"), "{args:?}: {e}");
            }
        }
        assert!(matches!(
            parse(&["weight-pool", "--pool", "code", "--weight", "-1"]),
            Ok(CtlCommand::WeightPool { weight, .. }) if (weight + 1.0).abs() < 1e-9
        ));
        assert!(matches!(
            parse(&["cost-cap", "--usd", "12.5"]),
            Ok(CtlCommand::CostCap { usd, .. }) if (usd - 12.5).abs() < 1e-9
        ));
        assert!(
            parse(&["cost-cap", "--usd", "lots"])
                .unwrap_err()
                .contains("not a number")
        );
    }
}
