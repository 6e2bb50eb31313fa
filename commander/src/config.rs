//! The commander's configuration: one struct tree, read from TOML, every field documented.
//!
//! Precedence: command-line flag > environment variable > config file > default. Syntax
//! errors carry the file, line and column (from the TOML parser); semantic errors are all
//! collected and reported together, each with its key path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_worker::protocol::{DEFAULT_PREFIX, Subjects, is_subject_token};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS.
    #[serde(default)]
    pub nats: NatsConfig,
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Where durable local state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// Task intake processing.
    #[serde(default)]
    pub intake: IntakeConfig,
    /// How tasks find pools until the classifier and router arrive.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Pools by name (`[pools.code]`). Empty means "any pool a task names is accepted".
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL. Unset: use 127.0.0.1:4222 if something listens there, else start
    /// a local `nats-server` (see `auto_start`). Env: `FLEET_NATS_URL`.
    #[serde(default)]
    pub url: Option<String>,
    /// Subject prefix shared by the whole fleet.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// With no URL and nothing on 127.0.0.1:4222, start `nats-server` as a child process.
    #[serde(default = "yes")]
    pub auto_start: bool,
    /// How long to wait for the server at start, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Address probed when no URL is set, and where an auto-started server listens.
    #[serde(default = "default_local")]
    pub local_default: SocketAddr,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            prefix: default_prefix(),
            auto_start: true,
            connect_timeout_ms: default_connect_timeout_ms(),
            local_default: default_local(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the API binds; port 0 picks a free port (logged). Env: `FLEET_HTTP_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory for the sled store (and an auto-started nats-server's JetStream files).
    /// Env: `FLEET_DATA_DIR`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Hours a finished task's record is kept (the results stream keeps results 7 days).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            retention_hours: default_retention_hours(),
        }
    }
}

fn default_retention_hours() -> u64 {
    7 * 24
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeConfig {
    /// Most intake messages handled per batch (one store flush and one round of acks each).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seconds the commander has to dispatch a batch before JetStream redelivers it (to
    /// this or another replica). A batch takes milliseconds; this bounds the stall after
    /// a crash.
    #[serde(default = "default_intake_ack_wait_secs")]
    pub ack_wait_secs: u64,
    /// Seconds a worker has to ack (or signal progress) before redelivery.
    #[serde(default = "default_ack_wait_secs")]
    pub work_ack_wait_secs: u64,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch(),
            ack_wait_secs: default_intake_ack_wait_secs(),
            work_ack_wait_secs: default_ack_wait_secs(),
        }
    }
}

impl IntakeConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
    pub fn work_ack_wait(&self) -> Duration {
        Duration::from_secs(self.work_ack_wait_secs)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Pool for tasks that name none and whose capabilities no pool lists. Unset: such
    /// tasks are rejected with a reason.
    #[serde(default)]
    pub default_pool: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// What this pool's workers can do; a task goes to the first pool (by name) that has
    /// every capability it asks for.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// For operators.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}
fn yes() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4222))
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_batch() -> usize {
    256
}
fn default_intake_ack_wait_secs() -> u64 {
    10
}
fn default_ack_wait_secs() -> u64 {
    30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: origin.to_path_buf(),
            problems,
        })?;
        Ok(config)
    }

    /// Every semantic problem, each with its key path.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if Subjects::new(&self.nats.prefix).is_err() {
            p.push(format!(
                "nats.prefix: {:?} must be dot-separated tokens of letters, digits, '-' or '_'",
                self.nats.prefix
            ));
        }
        if let Some(url) = &self.nats.url
            && url.trim().is_empty()
        {
            p.push("nats.url: must not be empty (leave it out to auto-detect)".into());
        }
        if self.store.retention_hours == 0 {
            p.push("store.retention_hours: must be at least 1".into());
        }
        if self.intake.batch_size == 0 || self.intake.batch_size > 10_000 {
            p.push(format!(
                "intake.batch_size: {} is out of range 1-10000",
                self.intake.batch_size
            ));
        }
        if self.intake.ack_wait_secs == 0 {
            p.push("intake.ack_wait_secs: must be at least 1".into());
        }
        if self.intake.work_ack_wait_secs == 0 {
            p.push("intake.work_ack_wait_secs: must be at least 1".into());
        }
        for (name, pool) in &self.pools {
            if !is_subject_token(name) {
                p.push(format!(
                    "pools.{name}: a pool name must be 1-128 letters, digits, '-' or '_'"
                ));
            }
            if pool.capabilities.iter().any(|c| c.is_empty()) {
                p.push(format!(
                    "pools.{name}.capabilities: must not contain empty strings"
                ));
            }
        }
        if let Some(d) = &self.routing.default_pool {
            if !is_subject_token(d) {
                p.push(format!(
                    "routing.default_pool: {d:?} is not a valid pool name"
                ));
            } else if !self.pools.is_empty() && !self.pools.contains_key(d) {
                p.push(format!(
                    "routing.default_pool: {d:?} is not one of the configured pools"
                ));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    pub fn subjects(&self) -> Subjects {
        // Validated in `validate`; a bad prefix falls back to the default rather than panic.
        Subjects::new(&self.nats.prefix).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.nats.prefix, "fleet");
    }

    #[test]
    fn unknown_field_is_a_syntax_error_with_line() {
        let err = Config::parse(
            "[nats]\nprefix = \"fleet\"\nurll = \"x\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(
            msg.contains("c.toml") && msg.contains("line 3") && msg.contains("urll"),
            "{msg}"
        );
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        let text = "[nats]\nprefix = \"a.*\"\n[intake]\nbatch_size = 0\n[routing]\ndefault_pool = \"nope\"\n[pools.code]\ncapabilities = [\"\"]\n";
        let ConfigError::Invalid { problems, .. } =
            Config::parse(text, Path::new("c.toml")).unwrap_err()
        else {
            panic!("should be invalid")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
