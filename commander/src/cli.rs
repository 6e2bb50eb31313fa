//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

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
        config
            .validate()
            .map_err(|problems| crate::config::ConfigError::Invalid {
                path: origin,
                problems,
            })?;
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
}

/// Runs a parsed command line; the exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(cli.log_format);
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { files },
        } => {
            let mut failed = false;
            for f in &files {
                match Config::load(f) {
                    Ok(_) => tracing::info!(file = %f.display(), "config is valid"),
                    Err(e) => {
                        failed = true;
                        tracing::error!("{e}");
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Serve(args) => {
            let config = match args.resolve() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::serve::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
