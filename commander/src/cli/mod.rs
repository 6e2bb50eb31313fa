//! Command-line interface.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

mod ctl;
mod policy;
pub use ctl::CtlArgs;
pub use policy::PolicyCommand;

#[derive(Debug, Parser)]
#[command(
    name = "commander",
    version,
    about = "Runs fleets of LLM agents over NATS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FLEET_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the commander.
    Serve(ServeArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Routing rubric tools.
    Rubric {
        #[command(subcommand)]
        command: RubricCommand,
    },
    /// The routing decision log.
    Decisions {
        #[command(subcommand)]
        command: DecisionsCommand,
    },
    /// Alerts as the detector raises them.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Policy tools: check, test, replay, push.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The control plane: pause, drain, resume, cancel, purge, block, reroute, weigh and
    /// restore pools, cap spend; the audit and what is in force (docs/api.md, "Control").
    Ctl(CtlArgs),
}

#[derive(Debug, Subcommand)]
pub enum RubricCommand {
    /// Validate rubric files (against the model registry, and the pools of a config when
    /// given); exits non-zero on any error.
    Check {
        /// Rubric files (TOML), each checked on its own.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check candidate pools against this config's `[pools]` (and use its registry).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model registry to check models against (default: the config's, else built in).
        #[arg(long)]
        registry: Option<PathBuf>,
    },
}

/// What every `tail` takes: where NATS is, and how to print.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Config file, for the NATS URL and subject prefix.
    #[arg(long, short, env = "FLEET_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL (default: the config's, else nats://127.0.0.1:4222).
    #[arg(long, env = "FLEET_NATS_URL")]
    nats_url: Option<String>,
    /// One JSON object per line instead of a readable line.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum DecisionsCommand {
    /// Print decisions as the commander makes them (from `<prefix>.decisions.>` on NATS).
    Tail {
        #[command(flatten)]
        tail: TailArgs,
        /// Only this pool's decisions (`_rejected` for rejections).
        #[arg(long)]
        pool: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Print alerts as they fire, renotify and resolve (from `<prefix>.alerts.>` on NATS).
    Tail {
        #[command(flatten)]
        tail: TailArgs,
        /// Only this severity (`info`, `warning`, `critical`).
        #[arg(long)]
        severity: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate config files without starting anything; exits non-zero on any error.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Config file (TOML). Without one, defaults apply.
    #[arg(long, short, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL; overrides the config file.
    #[arg(long, env = "FLEET_NATS_URL")]
    pub nats_url: Option<String>,
    /// HTTP listen address; overrides the config file.
    #[arg(long, env = "FLEET_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// OTLP/gRPC listen address; overrides the config file.
    #[arg(long, env = "FLEET_OTLP_GRPC_LISTEN")]
    pub otlp_grpc_listen: Option<SocketAddr>,
    /// OTLP/HTTP listen address; overrides the config file.
    #[arg(long, env = "FLEET_OTLP_HTTP_LISTEN")]
    pub otlp_http_listen: Option<SocketAddr>,
    /// Data directory; overrides the config file.
    #[arg(long, env = "FLEET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// The config file (or defaults) with flags and environment applied on top.
    pub fn resolve(&self) -> Result<Config, crate::config::ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.nats_url {
            config.nats.url = Some(url.clone());
        }
        if let Some(addr) = self.http_listen {
            config.http.listen = addr;
        }
        if let Some(addr) = self.otlp_grpc_listen {
            config.telemetry.grpc_listen = addr;
        }
        if let Some(addr) = self.otlp_http_listen {
            config.telemetry.http_listen = addr;
        }
        if let Some(dir) = &self.data_dir {
            config.store.data_dir = dir.clone();
        }
        let origin = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("<flags>"));
        // The file was checked with its lines on load; this catches what flags and the
        // environment set.
        config.validate_at(&origin, None)?;
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().init(),
    }
    // A panic is a structured log line with where it happened (the supervisor that
    // catches it logs the restart); the default hook's bare stderr text is not.
    std::panic::set_hook(Box::new(|info| {
        let cause = crate::supervise::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            cause = %cause,
            location,
            thread = thread.name().unwrap_or("unnamed"),
            "panic"
        );
    }));
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says
/// otherwise (mimalloc reads it). mimalloc asks for huge pages on its arenas and gives
/// back to the system what it has not used for a second, so on the task path a page taken
/// again cost the kernel zeroing a whole 2 MiB huge page: `clear_page_erms` was 15 % of
/// the commander's CPU in `fleet-sim bench dispatch`. With huge pages off, the same bench
/// measured 4-9 % less CPU per task and 10-20 % less resident memory. `fleet-sim` calls
/// it too, so its in-process benchmarks run the commander's code as the commander does.
pub fn small_pages_only() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Refused only by kernels older than 3.15; huge pages then stay as they were.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}

/// Runs a parsed command line; the exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(cli.log_format);
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { files },
        } => check_each(&files, |f| {
            Config::load(f)?;
            tracing::info!(file = %f.display(), "config is valid");
            Ok::<_, crate::config::ConfigError>(())
        }),
        Command::Rubric {
            command:
                RubricCommand::Check {
                    files,
                    config,
                    registry,
                },
        } => rubric_check(&files, config.as_deref(), registry.as_deref()),
        Command::Decisions {
            command: DecisionsCommand::Tail { tail, pool },
        } => run_async(
            tokio::runtime::Builder::new_current_thread(),
            decisions_tail(tail, pool),
        ),
        Command::Alerts {
            command: AlertsCommand::Tail { tail, severity },
        } => run_async(
            tokio::runtime::Builder::new_current_thread(),
            alerts_tail(tail, severity),
        ),
        Command::Policy { command } => policy::run(command),
        Command::Ctl(args) => ctl::run(args),
        Command::Serve(args) => {
            let config = match args.resolve() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_async(
                tokio::runtime::Builder::new_multi_thread(),
                crate::serve::serve(config),
            )
        }
    }
}

/// Runs `fut` to completion on a runtime from `builder`; its error is logged and fails.
pub(crate) fn run_async<E: std::fmt::Display>(
    mut builder: tokio::runtime::Builder,
    fut: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn rubric_check(files: &[PathBuf], config: Option<&Path>, registry: Option<&Path>) -> ExitCode {
    use crate::classify::rubric::{CheckAgainst, Rubric};
    use crate::registry::Registry;
    let config = match config.map(Config::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let reg_path = registry.map(Path::to_path_buf).or_else(|| {
        config
            .as_ref()
            .and_then(|c| c.telemetry.model_registry.clone())
    });
    let reg = match reg_path
        .as_deref()
        .map(Registry::load)
        .unwrap_or_else(Registry::builtin)
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("model registry: {e}");
            return ExitCode::from(2);
        }
    };
    let pools = config.as_ref().map(|c| &c.pools).filter(|p| !p.is_empty());
    check_each(files, |f| {
        let r = Rubric::load(
            f,
            CheckAgainst {
                registry: Some(&reg),
                pools,
            },
        )?;
        tracing::info!(
            file = %f.display(),
            task_types = r.task_types.len(),
            tiers = r.tiers.len(),
            "rubric is valid"
        );
        Ok::<_, crate::classify::rubric::RubricError>(())
    })
}

/// Runs `check` on every file, logs every failure, and fails if any did.
fn check_each<E: std::fmt::Display>(
    files: &[PathBuf],
    check: impl Fn(&Path) -> Result<(), E>,
) -> ExitCode {
    let mut failed = false;
    for f in files {
        if let Err(e) = check(f) {
            failed = true;
            tracing::error!("{e}");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[derive(Debug, thiserror::Error)]
enum TailError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
    #[error("cannot write: {0}")]
    Write(#[from] std::io::Error),
}

/// Where `tail` reads from: the config (NATS URL, prefix) and the URL given.
async fn tail_connect(
    args: &TailArgs,
) -> Result<(async_nats::Client, fleet_worker::Subjects), TailError> {
    let nats_url = args.nats_url.clone();
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let url = nats_url
        .or(config.nats.url.clone())
        .unwrap_or_else(|| format!("nats://{}", config.nats.local_default));
    let failed = |reason: String| TailError::Connect {
        url: crate::broker::redacted(&url),
        reason,
    };
    // Signed in as the commander is ([nats] in the config).
    let options = config
        .nats
        .auth()
        .and_then(|auth| auth.apply(async_nats::ConnectOptions::new(), &url))
        .map_err(|e| failed(e.to_string()))?;
    let client = async_nats::connect_with_options(&url, options)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok((client, config.subjects()))
}

/// Prints each message on `subject` (raw JSON, or the line `render` makes) until `count`.
async fn tail(
    what: &'static str,
    args: &TailArgs,
    client: async_nats::Client,
    subject: String,
    render: impl Fn(&[u8]) -> Result<String, serde_json::Error>,
) -> Result<(), TailError> {
    let (json, count) = (args.json, args.count);
    use futures::StreamExt;
    use std::io::Write;
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| TailError::Subscribe(e.to_string()))?;
    // Flushed so the subscription is registered before the first message can be missed.
    let _ = client.flush().await;
    // Scripts (and the e2e tests) wait for this line before they expect messages.
    tracing::info!(%subject, "tailing {what}");
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while let Some(msg) = sub.next().await {
        let mut out = stdout.lock();
        if json {
            out.write_all(&msg.payload)?;
            out.write_all(b"\n")?;
        } else {
            match render(&msg.payload) {
                Ok(line) => writeln!(out, "{line}")?,
                Err(e) => writeln!(out, "unreadable message on {}: {e}", msg.subject)?,
            }
        }
        out.flush()?;
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

async fn decisions_tail(args: TailArgs, pool: Option<String>) -> Result<(), TailError> {
    let (client, subjects) = tail_connect(&args).await?;
    let subject = subjects.decisions(pool.as_deref().unwrap_or(">"));
    tail("decisions", &args, client, subject, |payload| {
        let d = serde_json::from_slice::<crate::decisions::DecisionRecord>(payload)?;
        Ok(format!(
            "{} {} {:?} {}/{} {} -> {} {} [{}{}] {}",
            d.at,
            d.task_id,
            d.outcome,
            d.task_type,
            d.tier,
            d.classification.source.as_str(),
            d.pool.as_deref().unwrap_or("-"),
            d.model.as_deref().unwrap_or("-"),
            d.rule,
            d.est_cost_usd
                .map(|c| format!(" ${c:.5}"))
                .unwrap_or_default(),
            d.reason
        ))
    })
    .await
}

async fn alerts_tail(args: TailArgs, severity: Option<String>) -> Result<(), TailError> {
    let (client, subjects) = tail_connect(&args).await?;
    let subject = subjects.alerts(severity.as_deref().unwrap_or(">"));
    tail("alerts", &args, client, subject, |payload| {
        let v: serde_json::Value = serde_json::from_slice(payload)?;
        // Detector alerts carry `event`; budget notices name their `alert`.
        Ok(match v.get("event").and_then(|e| e.as_str()) {
            Some(event) => {
                let a = &v["alert"];
                format!(
                    "{} {} {} {} {} — {}",
                    crate::policy::budget::rfc3339(a["started_ms"].as_u64().unwrap_or(0)),
                    event,
                    a["severity"].as_str().unwrap_or("?"),
                    a["rule"].as_str().unwrap_or("?"),
                    a["labels"],
                    a["message"].as_str().unwrap_or("")
                )
            }
            None => format!("{} {}", v["alert"].as_str().unwrap_or("notice"), v),
        })
    })
    .await
}
