//! Test support: real processes, never stand-ins.
//!
//! - [`NatsServer`]: a `nats-server` with JetStream, on a port the server picks (`-p -1`),
//!   its store, log and pid in a temp dir; killed and cleaned up on drop.
//! - [`Alertmanager`]: a real Alertmanager on loopback (alert delivery tests).
//! - [`Commander`]: the real `commander` binary as a child process, with a temp config,
//!   waited on until it logs that it is listening; killed on drop.
//!
//! Readiness is waited for by polling with a deadline, never by fixed sleeps.

pub mod alertmanager;
pub mod fake_llm;

pub use alertmanager::Alertmanager;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "`{0}` was not found. Install NATS with `sudo apt-get install nats-server` (Debian/Ubuntu), \
         or point NATS_SERVER_BIN at a nats-server binary"
    )]
    NatsMissing(String),
    #[error(
        "`{0}` was not found. Install Alertmanager with `sudo apt-get install prometheus-alertmanager` \
         (Debian/Ubuntu), or point ALERTMANAGER_BIN at an alertmanager binary"
    )]
    AlertmanagerMissing(String),
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {timeout:?}; its log:\n{log}")]
    NotReady {
        what: String,
        timeout: Duration,
        log: String,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl TestkitError {
    /// Why `bin` did not start: `missing` names it when there is no such file (with how to
    /// install it), anything else is a spawn error.
    pub(crate) fn of_spawn(
        bin: &str,
        e: std::io::Error,
        missing: fn(String) -> TestkitError,
    ) -> TestkitError {
        match e.kind() {
            std::io::ErrorKind::NotFound => missing(bin.to_string()),
            _ => TestkitError::Spawn {
                what: bin.to_string(),
                source: e,
            },
        }
    }
}

/// The nats-server binary to use: `$NATS_SERVER_BIN`, else `nats-server` on PATH.
/// The extra config a server was started with, in its directory.
const CONFIG_FILE: &str = "nats.conf";

pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// Checks that `bin` can be run (`bin --version`) without starting a server: what it
/// printed, or the error a start would give (a missing install names how to get one). For
/// long commands that need a server only at their end.
pub fn nats_server_present(bin: &str) -> Result<String, TestkitError> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::of_spawn(bin, e, TestkitError::NatsMissing))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A running nats-server with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    version: String,
}

impl NatsServer {
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a server on a port of its own choosing and waits until it accepts clients.
    pub fn start() -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("fleet-nats-").tempdir()?;
        Self::start_in(dir)
    }

    fn start_in(dir: tempfile::TempDir) -> Result<Self, TestkitError> {
        Self::start_on(dir, "-1")
    }

    /// `n` servers in one JetStream cluster, routed to each other on ports picked here,
    /// each otherwise like [`Self::start`]. The cluster elects its JetStream leader a few
    /// seconds after this returns: retry the first JetStream request.
    pub fn cluster(n: usize) -> Result<Vec<Self>, TestkitError> {
        // Every route port is held here until its node starts, so no two nodes draw the
        // same one and no other process takes one meanwhile. One can still be taken in
        // the moment between its release and the server's bind: nats-server then says it
        // is ready and exits, so each node is started until its route port listens.
        let held = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<u16>, _>>()?;
        let routes = ports
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::with_capacity(n);
        for (i, (listener, port)) in held.into_iter().zip(ports).enumerate() {
            drop(listener);
            nodes.push(Self::cluster_node(i, port, &routes)?);
        }
        Ok(nodes)
    }

    /// Node `i` of [`Self::cluster`], listening for routes on `port` (another one, which
    /// the others learn of from it, when `port` was taken before it could bind).
    fn cluster_node(i: usize, port: u16, routes: &str) -> Result<Self, TestkitError> {
        let mut port = port;
        let mut last = String::new();
        for _ in 0..5 {
            let mut node = Self::start_with_config(&format!(
                "server_name: n{i}\ncluster {{\n  name: fleet-test\n  listen: \"127.0.0.1:{port}\"\n  routes: [{routes}]\n}}\n"
            ))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let log =
                    std::fs::read_to_string(node.dir.path().join("nats.log")).unwrap_or_default();
                if log.contains("Listening for route connections on") {
                    return Ok(node);
                }
                if has_exited(&mut node.child) || Instant::now() > deadline {
                    last = log;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
        }
        Err(TestkitError::NotReady {
            what: format!("cluster node n{i} (its route port)"),
            timeout: Duration::from_secs(15),
            log: last,
        })
    }

    /// Starts a server that also reads `config` (nats-server's config format: an
    /// `authorization` block, `tls`, …), kept for [`Self::restart`]. Paths in it are
    /// taken from the server's working directory; give them whole.
    pub fn start_with_config(config: &str) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("fleet-nats-").tempdir()?;
        std::fs::write(dir.path().join(CONFIG_FILE), config)?;
        Self::start_in(dir)
    }

    /// Starts a server in `dir` (its JetStream store is there) on `port` (`-1`: any).
    fn start_on(dir: tempfile::TempDir, port: &str) -> Result<Self, TestkitError> {
        let bin = nats_server_bin();
        let log = dir.path().join("nats.log");
        // A fresh log, so readiness is read from this run's lines.
        let _ = std::fs::remove_file(&log);
        let config = dir.path().join(CONFIG_FILE);
        let mut command = Command::new(&bin);
        if config.exists() {
            command.arg("-c").arg(&config);
        }
        let child = command
            .arg("-js")
            .args(["-a", "127.0.0.1", "-p", port])
            .arg("-sd")
            .arg(dir.path().join("jetstream"))
            .arg("-l")
            .arg(&log)
            .arg("-P")
            .arg(dir.path().join("nats.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestkitError::of_spawn(&bin, e, TestkitError::NatsMissing))?;
        let mut server = Self {
            child: Some(child),
            dir,
            url: String::new(),
            version: String::new(),
        };
        let timeout = Duration::from_secs(15);
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Server is ready") {
                if let Some(addr) = text
                    .lines()
                    .find_map(|l| l.split("Listening for client connections on ").nth(1))
                {
                    server.url = format!("nats://{}", addr.trim());
                }
                if let Some(v) = text.lines().find_map(|l| l.split("Version:").nth(1)) {
                    server.version = v.trim().to_string();
                }
                if !server.url.is_empty() {
                    return Ok(server);
                }
            }
            let exited = has_exited(&mut server.child);
            if exited || Instant::now() > deadline {
                return Err(TestkitError::NotReady {
                    what: "nats-server".into(),
                    timeout,
                    log: text,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Server version as it logged it, e.g. `2.9.10`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server at once (SIGKILL), as a crash would. Its store stays.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (after [`Self::kill9`]).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill9();
        let port = self.url.rsplit(':').next().unwrap_or("-1").to_string();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        let fresh = Self::start_on(dir, &port)?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The commander binary built by cargo for this workspace.
///
/// `$FLEET_COMMANDER_BIN` wins; otherwise [`sibling_bin`].
pub fn commander_bin() -> PathBuf {
    match std::env::var("FLEET_COMMANDER_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => sibling_bin("commander"),
    }
}

/// A workspace binary next to the running executable, or next to its `deps/` directory when
/// it is a test: `target/<profile>/<name>`, where cargo puts workspace binaries.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A running commander process.
#[derive(Debug)]
pub struct Commander {
    child: Option<Child>,
    dir: PathBuf,
    http: String,
    otlp_grpc: Option<String>,
    otlp_http: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
}

/// How to start a commander.
#[derive(Debug, Clone)]
pub struct CommanderOptions {
    pub bin: PathBuf,
    pub nats_url: Option<String>,
    /// Extra TOML appended to the generated config (pools etc.).
    pub config_toml: String,
    /// Data dir; reuse one to restart a commander on the same store.
    pub data_dir: PathBuf,
    pub extra_env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

impl Commander {
    /// Starts `commander serve` with an HTTP port of 0 and waits for its "listening" log line.
    pub fn start(opts: &CommanderOptions) -> Result<Self, TestkitError> {
        std::fs::create_dir_all(&opts.data_dir)?;
        let config = opts.data_dir.join("commander.toml");
        let mut toml = String::new();
        toml.push_str("[http]\nlisten = \"127.0.0.1:0\"\n\n");
        toml.push_str(&format!(
            "[store]\ndata_dir = {:?}\n\n",
            opts.data_dir.join("store")
        ));
        toml.push_str(&opts.config_toml);
        std::fs::write(&config, toml)?;
        let mut cmd = Command::new(&opts.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .args(&opts.extra_args);
        if let Some(url) = &opts.nats_url {
            cmd.env("FLEET_NATS_URL", url);
        } else {
            cmd.env_remove("FLEET_NATS_URL");
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("FLEET_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd.env("NO_COLOR", "1");
        // Free ports for the OTLP receivers, so tests run side by side.
        cmd.env("FLEET_OTLP_GRPC_LISTEN", "127.0.0.1:0");
        cmd.env("FLEET_OTLP_HTTP_LISTEN", "127.0.0.1:0");
        for (k, v) in &opts.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TestkitError::Spawn {
                what: opts.bin.display().to_string(),
                source: e,
            })?;
        let log = Arc::new(Mutex::new(Vec::new()));
        // Drain both pipes for the life of the process so it never blocks on a full pipe.
        for reader in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if std::env::var_os("FLEET_TEST_ECHO").is_some() {
                        #[expect(
                            clippy::print_stderr,
                            reason = "opt-in echo of the child's log into the test output"
                        )]
                        {
                            eprintln!("[commander] {line}");
                        }
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push(line);
                    }
                }
            });
        }
        let mut me = Self {
            child: Some(child),
            dir: opts.data_dir.clone(),
            http: String::new(),
            otlp_grpc: None,
            otlp_http: None,
            log,
        };
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        let addr_after = |what: &'static str| {
            move |l: &str| {
                l.contains(what)
                    .then(|| {
                        l.split("addr=")
                            .nth(1)
                            .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
                    })
                    .flatten()
            }
        };
        loop {
            // The OTLP receivers bind before the API, so their lines are there by now.
            if let Some(addr) = me.find_log(addr_after("http api listening")) {
                me.http = format!("http://{addr}");
                me.otlp_grpc = me
                    .find_log(addr_after("otlp grpc listening"))
                    .map(|a| format!("http://{a}"));
                me.otlp_http = me
                    .find_log(addr_after("otlp http listening"))
                    .map(|a| format!("http://{a}"));
                return Ok(me);
            }
            let exited = has_exited(&mut me.child);
            if exited || Instant::now() > deadline {
                return Err(TestkitError::NotReady {
                    what: "commander".into(),
                    timeout,
                    log: me.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http(&self) -> &str {
        &self.http
    }

    /// The OTLP/gRPC endpoint, `http://127.0.0.1:<port>` (None when turned off).
    pub fn otlp_grpc(&self) -> Option<&str> {
        self.otlp_grpc.as_deref()
    }

    /// The OTLP/HTTP base URL, `http://127.0.0.1:<port>` (None when turned off).
    pub fn otlp_http(&self) -> Option<&str> {
        self.otlp_http.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Every line the process printed so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    fn find_log<T>(&self, f: impl Fn(&str) -> Option<T>) -> Option<T> {
        self.log.lock().ok()?.iter().find_map(|l| f(l))
    }

    /// Whether any logged line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.find_log(|l| l.contains(needle).then_some(()))
            .is_some()
    }

    /// Waits until a logged line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logged(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the process to completion (for commands that exit); returns exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Commander {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn has_exited(child: &mut Option<Child>) -> bool {
    child
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nats_server_is_named_with_how_to_install_it() {
        let err = nats_server_present("/nonexistent/nats-server").unwrap_err();
        assert!(matches!(err, TestkitError::NatsMissing(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/nats-server"), "{text}");
        assert!(text.contains("apt-get install nats-server"), "{text}");
    }

    /// A route port taken before the node could bind it (in CI, once, by another test's
    /// server in the moment between its release and the bind): nats-server said it was
    /// ready and exited, and the cluster never elected its JetStream leader. The node is
    /// started again on another port.
    #[test]
    fn a_cluster_node_whose_route_port_is_taken_listens_on_another() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let node =
            NatsServer::cluster_node(0, port, &format!("\"nats://127.0.0.1:{port}\"")).unwrap();
        let log = std::fs::read_to_string(node.dir().join("nats.log")).unwrap();
        let listening = log
            .lines()
            .find_map(|l| {
                l.split("Listening for route connections on 127.0.0.1:")
                    .nth(1)
            })
            .unwrap();
        assert_ne!(listening.trim(), port.to_string(), "{log}");
        assert!(node.pid().is_some());
    }

    #[test]
    fn the_nats_server_in_use_is_present() {
        let version = nats_server_present(&nats_server_bin()).unwrap();
        assert!(version.contains("nats-server"), "{version}");
    }
}
