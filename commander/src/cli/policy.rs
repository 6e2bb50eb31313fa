//! `commander policy check|test|replay|push`.
//!
//! `check` and `test` run offline (the files, a config's pools, the registry and the
//! rubric); `replay` and `push` talk to a running commander's API, because the decision
//! log lives in its store and the policy in force is its to change.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::classify::rubric::Rubric;
use crate::config::Config;
use crate::policy::load::{self, Document, Policy};
use crate::policy::{CheckAgainst, PolicyError, testcase};
use crate::registry::Registry;
use crate::route::RoutingTable;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files (or directories of `*.policy.toml`) as one policy, without
    /// starting anything; exits non-zero on any error.
    Check(Offline),
    /// Validate, then run every embedded `[[test]]`; exits non-zero if any fails.
    Test(Offline),
    /// Re-run a running commander's recent decisions under these files and report what
    /// would change. Dispatches nothing.
    Replay {
        /// `*.policy.toml` files or directories of them, together the candidate policy.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// How far back (`1h`, `30m`, `2d`).
        #[arg(long, default_value = "1h")]
        last: String,
        /// The commander's API.
        #[arg(long, env = "FLEET_API", default_value = "http://127.0.0.1:8080")]
        api: String,
        /// Print the whole report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make these files the policy in force (`PUT /v1/policy`, compliance token needed).
    Push {
        /// `*.policy.toml` files or directories of them, together the new policy.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, env = "FLEET_API", default_value = "http://127.0.0.1:8080")]
        api: String,
        /// Environment variable holding the compliance token.
        #[arg(long, default_value = "FLEET_COMPLIANCE_TOKEN")]
        token_env: String,
        /// Who is pushing, for the audit trail.
        #[arg(long, env = "USER", default_value = "cli")]
        identity: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct Offline {
    /// `*.policy.toml` files or directories of them, checked together as one policy.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Check pools against this config (and use its registry and rubric).
    #[arg(long, short, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
}

pub fn run(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check(o) => offline(&o, false),
        PolicyCommand::Test(o) => offline(&o, true),
        PolicyCommand::Replay {
            files,
            last,
            api,
            json,
        } => super::run_async(
            tokio::runtime::Builder::new_current_thread(),
            replay(files, last, api, json),
        ),
        PolicyCommand::Push {
            files,
            api,
            token_env,
            identity,
        } => super::run_async(
            tokio::runtime::Builder::new_current_thread(),
            push(files, api, token_env, identity),
        ),
    }
}

/// The documents named on the command line: files as given, directories expanded.
fn read_all(files: &[PathBuf]) -> Result<Vec<Document>, PolicyError> {
    let mut docs = Vec::new();
    for f in files {
        if f.is_dir() {
            docs.extend(load::read_dir(f)?);
        } else {
            docs.push(load::read_file(f)?);
        }
    }
    Ok(docs)
}

fn offline(o: &Offline, run_tests: bool) -> ExitCode {
    let config = match o.config.as_deref().map(Config::load).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let setup = || -> Result<(Registry, Rubric, RoutingTable), String> {
        let registry = match config.telemetry.model_registry.as_deref() {
            Some(p) => Registry::load(p),
            None => Registry::builtin(),
        }
        .map_err(|e| format!("model registry: {e}"))?;
        let rubric = match &config.classifier.rubric {
            Some(p) => Rubric::load(
                p,
                crate::classify::rubric::CheckAgainst {
                    registry: Some(&registry),
                    pools: None,
                },
            ),
            None => Rubric::builtin(),
        }
        .map_err(|e| format!("rubric: {e}"))?;
        let table = RoutingTable {
            pools: config.pools.clone(),
            routing: config.routing.clone(),
        };
        Ok((registry, rubric, table))
    };
    let (registry, rubric, table) = match setup() {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let against = CheckAgainst {
        pools: Some(&table.pools),
        registry: &registry,
        rubric: &rubric,
    };
    let policy = match read_all(&o.files).and_then(|docs| Policy::parse(docs, against)) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("policy rejected: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "valid: {} (sha256 {})",
        policy.summary(),
        policy.sha256
    );
    if !run_tests {
        return ExitCode::SUCCESS;
    }
    report_tests(&policy, &against, &table, &mut out)
}

fn report_tests(
    policy: &Policy,
    against: &CheckAgainst<'_>,
    table: &RoutingTable,
    out: &mut impl Write,
) -> ExitCode {
    let results = testcase::run(policy, against.rubric, against.registry, table);
    let failed = results.iter().filter(|r| !r.passed).count();
    for r in &results {
        let mark = if r.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "{mark} {} ({}, at {})\n     {}",
            r.name, r.at, r.now, r.got
        );
        for f in &r.failures {
            let _ = writeln!(out, "     - {f}");
        }
    }
    let _ = writeln!(out, "{} passed, {failed} failed", results.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{api}: {reason}")]
    Http { api: String, reason: String },
    #[error("refused ({status}): {}", refusal(.body))]
    Refused { status: u16, body: String },
    #[error("cannot write: {0}")]
    Write(#[from] std::io::Error),
}

/// What a refusal's body says, for a person: a refused policy's problems one per line, as
/// `policy check` prints them; else the error's message; else the body as it came.
fn refusal(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return body.to_string();
    };
    let problems: Vec<&str> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .collect();
    if !problems.is_empty() {
        let mut text = format!("policy rejected: {} problem(s):", problems.len());
        for p in problems {
            text.push_str("\n  - ");
            text.push_str(p);
        }
        return text;
    }
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => body.to_string(),
    }
}

async fn send(req: reqwest::RequestBuilder, api: &str) -> Result<serde_json::Value, RemoteError> {
    let resp = req.send().await.map_err(|e| RemoteError::Http {
        api: api.to_string(),
        reason: e.to_string(),
    })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(RemoteError::Refused {
            status: status.as_u16(),
            body,
        });
    }
    serde_json::from_str(&body).map_err(|e| RemoteError::Http {
        api: api.to_string(),
        reason: format!("answer is not JSON: {e}"),
    })
}

fn body_of(files: &[PathBuf]) -> Result<String, RemoteError> {
    let docs = read_all(files)?;
    Ok(serde_json::json!({ "documents": docs }).to_string())
}

async fn replay(
    files: Vec<PathBuf>,
    last: String,
    api: String,
    json: bool,
) -> Result<(), RemoteError> {
    let body = body_of(&files)?;
    if humantime::parse_duration(&last).is_err() {
        return Err(RemoteError::Http {
            api,
            reason: format!("--last {last:?} is not a duration (1h, 30m, 2d)"),
        });
    }
    let url = format!("{}/v1/policy/replay?last={last}", api.trim_end_matches('/'));
    let req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(body);
    let r = send(req, &api).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{r:#}")?;
        return Ok(());
    }
    let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let f = |k: &str| r.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    writeln!(
        out,
        "replayed {} decisions from {} to {} under {}",
        n("decisions"),
        r["since"].as_str().unwrap_or("?"),
        r["until"].as_str().unwrap_or("?"),
        r["candidate_summary"].as_str().unwrap_or("?")
    )?;
    writeln!(
        out,
        "unchanged {}, rerouted {}, model changed {}, deferred {}, rejected {}, newly dispatched {}; drifted {} (the policy in force would also decide these differently now)",
        n("unchanged"),
        n("rerouted"),
        n("model_changed"),
        n("deferred"),
        n("rejected"),
        n("newly_dispatched"),
        n("drifted")
    )?;
    writeln!(
        out,
        "projected cost ${:.4} -> ${:.4} (delta ${:+.4})",
        f("cost_before_usd"),
        f("cost_after_usd"),
        f("cost_delta_usd")
    )?;
    for c in r["changes"].as_array().into_iter().flatten().take(20) {
        writeln!(
            out,
            "  {} {}: {} -> {} ({})",
            c["at"].as_str().unwrap_or(""),
            c["task_id"].as_str().unwrap_or(""),
            c["before"].as_str().unwrap_or(""),
            c["after"].as_str().unwrap_or(""),
            c["reason"].as_str().unwrap_or("")
        )?;
    }
    for c in r["caveats"].as_array().into_iter().flatten() {
        writeln!(out, "note: {}", c.as_str().unwrap_or(""))?;
    }
    Ok(())
}

async fn push(
    files: Vec<PathBuf>,
    api: String,
    token_env: String,
    identity: String,
) -> Result<(), RemoteError> {
    let body = body_of(&files)?;
    let token = std::env::var(&token_env).unwrap_or_default();
    let url = format!("{}/v1/policy", api.trim_end_matches('/'));
    let req = reqwest::Client::new()
        .put(&url)
        .bearer_auth(token)
        .header("fleet-identity", identity)
        .header("content-type", "application/json")
        .body(body);
    let r = send(req, &api).await?;
    writeln!(
        std::io::stdout().lock(),
        "accepted as {}",
        r["version"].as_str().unwrap_or("?")
    )?;
    Ok(())
}
