//! A real Alertmanager (Debian's `prometheus-alertmanager`, or `$ALERTMANAGER_BIN`) on
//! loopback, clustering off, its config and storage in a temp dir; killed on drop.
//!
//! Alertmanager cannot report a port it chose, so the kit asks the OS for a free one and
//! hands it over; a start that loses that race is tried again on another port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestkitError;

/// The Alertmanager binary: `$ALERTMANAGER_BIN`, else Debian's `prometheus-alertmanager`,
/// else `alertmanager` on PATH.
pub fn alertmanager_bin() -> String {
    if let Ok(b) = std::env::var("ALERTMANAGER_BIN") {
        return b;
    }
    for candidate in ["prometheus-alertmanager", "alertmanager"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(candidate).is_file()));
        if found {
            return candidate.to_string();
        }
    }
    "prometheus-alertmanager".to_string()
}

#[derive(Debug)]
pub struct Alertmanager {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    url: String,
    log: PathBuf,
}

/// One route to a receiver that sends nothing: the test reads alerts back from the API.
const CONFIG: &str = "route:\n  receiver: keep\n  group_wait: 1s\nreceivers:\n  - name: keep\n";

impl Alertmanager {
    pub fn start() -> Result<Self, TestkitError> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once() {
                Ok(am) => return Ok(am),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TestkitError::NotReady {
            what: "alertmanager".into(),
            timeout: Duration::ZERO,
            log: String::new(),
        }))
    }

    fn start_once() -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("fleet-am-").tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, CONFIG)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.path().join("alertmanager.log");
        let bin = alertmanager_bin();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| TestkitError::of_spawn(&bin, e, TestkitError::AlertmanagerMissing))?;
        let mut am = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            log,
        };
        let timeout = Duration::from_secs(15);
        let deadline = Instant::now() + timeout;
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::fs::read_to_string(&am.log)
                    .unwrap_or_default()
                    .contains("Listening");
            if ready {
                return Ok(am);
            }
            if crate::has_exited(&mut am.child) || Instant::now() > deadline {
                return Err(TestkitError::NotReady {
                    what: "alertmanager".into(),
                    timeout,
                    log: std::fs::read_to_string(&am.log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:<port>`: what a sink's `url` is.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
