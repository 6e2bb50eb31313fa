//! Reaching NATS: the configured server, one already on 127.0.0.1:4222, or a `nats-server`
//! we start ourselves; then the version check and the streams.

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use fleet_worker::protocol::Subjects;
use tokio::process::{Child, Command};

/// The oldest server the commander accepts (Debian bookworm ships 2.9.10).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 9);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "no NATS server: none is configured, nothing listens on {local}, and {reason}. \
         Install one (`sudo apt-get install nats-server` on Debian/Ubuntu, or \
         https://docs.nats.io/running-a-nats-service/introduction/installation), or point the \
         commander at a server with --nats-url, FLEET_NATS_URL or [nats] url in the config"
    )]
    NoServer { local: String, reason: String },
    #[error("could not connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS sign-in ([nats] in the config): {0}")]
    Auth(String),
    #[error("nats-server {version} is too old: the commander needs {}.{} or newer", MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1)]
    TooOld { version: String },
    #[error(
        "nats-server at {url} has JetStream disabled; start it with -js (or `jetstream {{}}` in its config)"
    )]
    NoJetStream { url: String },
    #[error("could not create stream or consumer {name}: {reason}")]
    Setup { name: String, reason: String },
}

/// A nats-server the commander started; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildServer {
    child: Child,
}

impl ChildServer {
    /// Asks the server to stop and waits a little for it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                tracing::info!("stopped the nats-server we started");
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// How the commander signs in to NATS, and the TLS it expects: read from `[nats]` once at
/// start (files and environment variables), so a missing secret is a start-up error that
/// names it rather than a reconnect loop.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    sign_in: SignIn,
    /// PEM file of the CAs that sign the server's certificate.
    tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key.
    tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// One way to sign in. Debug prints the way, never the secret.
#[derive(Clone, Default)]
pub enum SignIn {
    /// None configured: what the URL carries (`nats://user:password@host`,
    /// `nats://token@host`), else anonymous.
    #[default]
    FromUrl,
    /// A `.creds` file's contents: a user JWT and its NKey seed.
    Credentials(String),
    /// An NKey seed (`SU…`).
    NKey(String),
    UserPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignIn::FromUrl => "FromUrl",
            SignIn::Credentials(_) => "Credentials(…)",
            SignIn::NKey(_) => "NKey(…)",
            SignIn::UserPassword(..) => "UserPassword(…)",
            SignIn::Token(_) => "Token(…)",
        })
    }
}

impl Auth {
    pub fn new(
        sign_in: SignIn,
        tls_ca_file: Option<std::path::PathBuf>,
        tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> Self {
        Self {
            sign_in,
            tls_ca_file,
            tls_client,
        }
    }

    /// `options` signing in as configured to the server at `url` (whose user info is used
    /// when nothing else is configured), with the configured TLS.
    pub fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
        url: &str,
    ) -> Result<async_nats::ConnectOptions, BrokerError> {
        options = match &self.sign_in {
            SignIn::FromUrl => match url_user_info(url) {
                Some((user, Some(password))) => options.user_and_password(user, password),
                Some((token, None)) => options.token(token),
                None => options,
            },
            SignIn::Credentials(creds) => options.credentials(creds).map_err(|e| {
                BrokerError::Auth(format!(
                    "nats.credentials_file is not a credentials file: {e}"
                ))
            })?,
            SignIn::NKey(seed) => options.nkey(seed.clone()),
            SignIn::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            SignIn::Token(token) => options.token(token.clone()),
        };
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_client {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
}

/// A NATS URL as the client reads it: one without a scheme is `nats://`.
fn parse_nats_url(url: &str) -> Option<url::Url> {
    if url.contains("://") {
        url::Url::parse(url).ok()
    } else {
        url::Url::parse(&format!("nats://{url}")).ok()
    }
}

/// The user (or token) and password a NATS URL carries, percent-decoded. The Rust client
/// ignores them (the Go and Python clients take them), so the commander hands them over.
fn url_user_info(url: &str) -> Option<(String, Option<String>)> {
    let parsed = parse_nats_url(url)?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = parsed.username();
    if user.is_empty() {
        return None;
    }
    Some((decode(user), parsed.password().map(decode)))
}

/// `url` without its user info, for logs and errors: a password in the URL must not reach
/// either.
pub fn redacted(url: &str) -> String {
    match url.rsplit_once('@') {
        None => url.to_string(),
        Some((before, host)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***@{host}"),
            None => format!("***@{host}"),
        },
    }
}

/// Where NATS is, the commander's two connections to it, and the server we started, if any.
#[derive(Debug)]
pub struct Connection {
    /// The task path, the API, policies and control.
    pub client: async_nats::Client,
    /// Telemetry: the subscription to `<prefix>.telemetry.>` and the commander's own spans,
    /// on a connection the server never echoes to, so the spans the commander publishes do
    /// not come back to it through that subscription only to be dropped (in
    /// `fleet-sim bench dispatch` they were about 690 of the 1,940 bytes per task the
    /// server sent the commander). Its own connection also keeps telemetry's reads and
    /// writes off the task path's.
    pub telemetry: async_nats::Client,
    pub url: String,
    pub child: Option<ChildServer>,
}

/// Which of the commander's connections is being made.
#[derive(Clone, Copy, Debug)]
enum Link {
    TaskPath,
    Telemetry,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::TaskPath => "fleet-commander",
            Link::Telemetry => "fleet-commander-telemetry",
        }
    }
}

/// Both connections to the server at `url`.
async fn connect_both(
    url: String,
    auth: &Auth,
    timeout: Duration,
    child: Option<ChildServer>,
) -> Result<Connection, BrokerError> {
    let client = connect_with_retry(&url, auth, timeout, Link::TaskPath).await?;
    let telemetry = connect_with_retry(&url, auth, timeout, Link::Telemetry).await?;
    Ok(Connection {
        client,
        telemetry,
        url: redacted(&url),
        child,
    })
}

/// Connects per the rules in the config docs: explicit URL, else local default, else start
/// `nats-server` when allowed and installed, else a clear error.
pub async fn connect(
    url: Option<&str>,
    auth: &Auth,
    local_default: std::net::SocketAddr,
    auto_start: bool,
    data_dir: &Path,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    if let Some(url) = url {
        return connect_both(url.to_string(), auth, timeout, None).await;
    }
    let local = format!("nats://{local_default}");
    let no_server = |reason: String| BrokerError::NoServer {
        local: local_default.to_string(),
        reason,
    };
    if tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(local_default),
    )
    .await
    .is_ok_and(|r| r.is_ok())
    {
        tracing::info!(url = %local, "no NATS URL configured; using the server on the default port");
        return connect_both(local, auth, timeout, None).await;
    }
    if !auto_start {
        return Err(no_server("auto_start is off".into()));
    }
    let store = data_dir.join("nats");
    if let Err(e) = std::fs::create_dir_all(&store) {
        return Err(no_server(format!("cannot create {}: {e}", store.display())));
    }
    let child = Command::new("nats-server")
        .arg("-js")
        .args([
            "-a",
            &local_default.ip().to_string(),
            "-p",
            &local_default.port().to_string(),
        ])
        .arg("-sd")
        .arg(&store)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            no_server(match e.kind() {
                std::io::ErrorKind::NotFound => "nats-server is not on PATH".to_string(),
                _ => format!("starting nats-server failed: {e}"),
            })
        })?;
    tracing::info!(store = %store.display(), pid = child.id(), "started nats-server as a child process (it stops when the commander does)");
    connect_both(local, auth, timeout, Some(ChildServer { child })).await
}

async fn connect_with_retry(
    url: &str,
    auth: &Auth,
    timeout: Duration,
    link: Link,
) -> Result<async_nats::Client, BrokerError> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(50);
    // What the server last refused, so "not connected" can say why (a wrong password
    // only ever shows as a retried connection otherwise).
    let refused: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let shown = redacted(url);
    loop {
        let said = refused.clone();
        let mut attempt = async_nats::ConnectOptions::new()
            .name(link.name())
            .connection_timeout(Duration::from_secs(2))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let said = said.clone();
                async move {
                    let connection = link.name();
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(connection, "connected to NATS")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(connection, "disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::ClientError(e) => {
                            if let Ok(mut s) = said.lock() {
                                *s = Some(e.to_string());
                            }
                            tracing::debug!(connection, error = %e, "nats client error")
                        }
                        other => {
                            tracing::debug!(connection, event = %other, "nats connection event")
                        }
                    }
                }
            });
        if let Link::Telemetry = link {
            attempt = attempt.no_echo();
        }
        attempt = auth.apply(attempt, url)?;
        // retry_on_initial_connect makes connect() return at once; wait for the handshake.
        let result = async_nats::connect_with_options(url, attempt).await;
        match result {
            Ok(client) => loop {
                if client.connection_state() == async_nats::connection::State::Connected {
                    return Ok(client);
                }
                if Instant::now() > deadline {
                    let why = refused.lock().ok().and_then(|s| s.clone());
                    return Err(BrokerError::Connect {
                        url: shown,
                        reason: match why {
                            Some(e) => {
                                format!("not connected after {timeout:?}; the last attempt: {e}")
                            }
                            None => format!("not connected after {timeout:?}"),
                        },
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            },
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "NATS not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(BrokerError::Connect {
                    url: shown,
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Parses "2.9.10" (or "v2.10.0-beta") into (major, minor).
pub fn parse_version(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let mut it = v.split(['.', '-']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Logs the server version and refuses one that is too old or has no JetStream.
pub fn check_server(client: &async_nats::Client, url: &str) -> Result<(), BrokerError> {
    let info = client.server_info();
    tracing::info!(version = %info.version, server_name = %info.server_name, jetstream = info.jetstream, url, "connected to nats-server");
    match parse_version(&info.version) {
        Some(v) if v >= MIN_SERVER_VERSION => {}
        _ => {
            return Err(BrokerError::TooOld {
                version: info.version,
            });
        }
    }
    if !info.jetstream {
        return Err(BrokerError::NoJetStream {
            url: url.to_string(),
        });
    }
    Ok(())
}

/// The consumers the commander reads from.
#[derive(Debug)]
pub struct Streams {
    pub intake: consumer::Consumer<consumer::pull::Config>,
    pub results: consumer::Consumer<consumer::pull::Config>,
    pub results_stream: jetstream::stream::Stream,
    pub dead_letters: consumer::Consumer<consumer::pull::Config>,
}

/// Name of the commander's durable intake consumer (shared by every replica).
pub const INTAKE_CONSUMER: &str = "commander-intake";
/// Name of the results consumer that every replica shared until December 2026: each
/// replica now has its own ([`results_consumer_name`]).
pub const SHARED_RESULTS_CONSUMER: &str = "commander-results";

/// The durable results consumer of one commander replica (`commander-results-<replica>`).
/// Every replica reads every result: the one that keeps the task's record applies it,
/// whichever replica that is (docs/protocol.md, "Several replicas").
pub fn results_consumer_name(replica: &str) -> String {
    format!("{SHARED_RESULTS_CONSUMER}-{replica}")
}

/// This replica's results consumer, made on its first start. It begins after what the
/// consumer of an older release, shared by every replica, had acknowledged, so that no
/// result is missed across the upgrade; without one, at the next result. It goes away once
/// unused for as long as the results stream keeps a result.
async fn results_consumer(
    stream: &jetstream::stream::Stream,
    subjects: &Subjects,
    replica: &str,
    ack_wait: Duration,
    batch: usize,
) -> Result<consumer::Consumer<consumer::pull::Config>, BrokerError> {
    let name = results_consumer_name(replica);
    let nats = |e: &dyn std::fmt::Display| BrokerError::Setup {
        name: name.clone(),
        reason: e.to_string(),
    };
    if let Ok(c) = stream.get_consumer::<consumer::pull::Config>(&name).await {
        return Ok(c);
    }
    let deliver_policy = match stream.consumer_info(SHARED_RESULTS_CONSUMER).await {
        Ok(shared) => {
            let from = shared.ack_floor.stream_sequence.saturating_add(1);
            tracing::warn!(
                consumer = SHARED_RESULTS_CONSUMER,
                from_sequence = from,
                "the results consumer of an older release, shared by every replica, is still there: this replica reads on from where it had got. Once every replica runs this release, remove it: nats consumer rm {} {}",
                stream.cached_info().config.name,
                SHARED_RESULTS_CONSUMER
            );
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            }
        }
        Err(_) => consumer::DeliverPolicy::New,
    };
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("fleet commander replica {replica}: task results")),
            filter_subject: subjects.results_all(),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_ack_pending: (batch * 8) as i64,
            inactive_threshold: fleet_worker::protocol::RESULTS_MAX_AGE,
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&e))
}
/// Name of the commander's durable consumer of kept max-deliveries advisories.
pub const DEAD_LETTER_CONSUMER: &str = "commander-deadletter";
/// How long a kept advisory waits for a commander to handle it.
const ADVISORIES_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `<stem>_ADVISORIES`: JetStream's max-deliveries advisories for the work stream, kept.
/// The server publishes them on core NATS, so one sent while no commander was connected
/// (a commander restart, a broker restart that the commander reconnects to after the
/// server already gave up on a message) would be missed and its task would stay
/// `dispatched`. Captured by a stream, each waits for a commander; work-queue retention
/// hands each to one replica.
pub fn advisories_stream_config(subjects: &Subjects) -> jetstream::stream::Config {
    let work = subjects.work_stream();
    jetstream::stream::Config {
        name: format!("{}_ADVISORIES", work.trim_end_matches("_WORK")),
        description: Some("fleet commander: work messages JetStream gave up on".into()),
        subjects: vec![max_deliveries_subject(&work)],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        storage: jetstream::stream::StorageType::File,
        max_age: ADVISORIES_MAX_AGE,
        duplicate_window: fleet_worker::protocol::DEDUP_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

/// The max-deliveries advisory subject for every consumer of the work stream.
pub fn max_deliveries_subject(work_stream: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{work_stream}.*")
}

/// Creates (idempotently) the streams, the commander's consumers and one pool consumer per
/// configured pool.
/// A stream that existed before (made by hand, or by an older commander) is used as it
/// is; say where it differs from what docs/protocol.md §2 prescribes.
fn warn_if_differs(wanted: &jetstream::stream::Config, found: &jetstream::stream::Config) {
    use std::fmt::Debug;
    let differs = |what: &str, found: &dyn Debug, wanted: &dyn Debug| {
        let (f, w) = (format!("{found:?}"), format!("{wanted:?}"));
        (f != w).then(|| format!("{what} {f} (wanted {w})"))
    };
    let diffs: Vec<String> = [
        differs("retention", &found.retention, &wanted.retention),
        differs("storage", &found.storage, &wanted.storage),
        differs(
            "duplicate window",
            &found.duplicate_window,
            &wanted.duplicate_window,
        ),
        differs("max_age", &found.max_age, &wanted.max_age),
        differs("subjects", &found.subjects, &wanted.subjects),
        differs("replicas", &found.num_replicas, &wanted.num_replicas),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !diffs.is_empty() {
        tracing::warn!(stream = %wanted.name, differences = %diffs.join("; "), "stream exists with other settings; using it as it is");
    }
}

/// How `ensure_streams` sets up the streams and consumers.
#[derive(Clone, Copy, Debug)]
pub struct StreamSettings<'a> {
    /// `intake.ack_wait_secs`: the intake, results and dead-letter consumers' ack wait.
    pub intake_ack_wait: Duration,
    /// `intake.work_ack_wait_secs`: the pool consumers' ack wait.
    pub work_ack_wait: Duration,
    /// `intake.batch_size`: the intake and results consumers let 8 batches be pending.
    pub batch: usize,
    /// `nats.replicas`: JetStream copies of each stream created.
    pub replicas: usize,
    /// This commander replica ([`crate::store::Store::replica_id`]).
    pub replica: &'a str,
}

pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    pools: impl Iterator<Item = &str>,
    settings: StreamSettings<'_>,
) -> Result<Streams, BrokerError> {
    let StreamSettings {
        intake_ack_wait,
        work_ack_wait,
        batch,
        replicas,
        replica,
    } = settings;
    let setup = |name: &str, e: &dyn std::fmt::Display| BrokerError::Setup {
        name: name.to_string(),
        reason: e.to_string(),
    };
    let mut streams = Vec::with_capacity(4);
    for mut wanted in [
        subjects.intake_stream_config(),
        subjects.work_stream_config(),
        subjects.results_stream_config(),
        advisories_stream_config(subjects),
    ] {
        wanted.num_replicas = replicas;
        let stream = js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| setup(&wanted.name, &e))?;
        warn_if_differs(&wanted, &stream.cached_info().config);
        streams.push(stream);
    }
    let [intake_stream, work_stream, results_stream, advisories]: [jetstream::stream::Stream; 4] =
        streams
            .try_into()
            .map_err(|_| setup("streams", &"four streams expected"))?;
    let intake = intake_stream
        .get_or_create_consumer(
            INTAKE_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(INTAKE_CONSUMER.into()),
                description: Some("fleet commander: task intake".into()),
                filter_subject: subjects.submit(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: intake_ack_wait,
                max_ack_pending: (batch * 8) as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| setup(INTAKE_CONSUMER, &e))?;
    let results = results_consumer(&results_stream, subjects, replica, intake_ack_wait, batch)
        .await
        .map_err(|e| setup(&results_consumer_name(replica), &e))?;
    let dead_letters = advisories
        .get_or_create_consumer(
            DEAD_LETTER_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(DEAD_LETTER_CONSUMER.into()),
                description: Some("fleet commander: dead-lettering exhausted work".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: intake_ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| setup(DEAD_LETTER_CONSUMER, &e))?;
    for pool in pools {
        let name = fleet_worker::protocol::pool_consumer_name(pool);
        work_stream
            .get_or_create_consumer(&name, subjects.pool_consumer_config(pool, work_ack_wait))
            .await
            .map_err(|e| setup(&name, &e))?;
    }
    Ok(Streams {
        intake,
        results,
        results_stream,
        dead_letters,
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("v2.10.0-beta.1"), Some((2, 10)));
        assert!(parse_version("2.8.4").unwrap() < MIN_SERVER_VERSION);
        assert!(parse_version("2.15.1").unwrap() >= MIN_SERVER_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    /// The commander's own spans go out on the telemetry connection, which also reads
    /// `<prefix>.telemetry.>`: the server must not hand them back to it, while telemetry
    /// from anyone else (here the task-path connection) still arrives.
    #[tokio::test]
    async fn the_telemetry_connection_hears_others_but_not_itself() {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(
            Some(nats.url()),
            &Auth::default(),
            "127.0.0.1:1".parse().unwrap(),
            false,
            dir.path(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let mut sub = conn.telemetry.subscribe("fleet.telemetry.>").await.unwrap();
        conn.telemetry
            .publish("fleet.telemetry._commander.c1", "own".into())
            .await
            .unwrap();
        // A round trip to the server on the same connection: its "no responders" answer
        // comes after anything the server would have echoed for the publish before it (a
        // flush only empties the client's buffer).
        let round_trip = conn.telemetry.request("fleet.nobody", "".into()).await;
        assert!(
            matches!(&round_trip, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
            "{round_trip:?}"
        );
        conn.client
            .publish("fleet.telemetry.pool.w1", "other".into())
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("the other connection's message arrives")
            .unwrap();
        assert_eq!(first.payload.as_ref(), b"other");
        assert_eq!(first.subject.as_str(), "fleet.telemetry.pool.w1");
    }

    /// Each replica reads every result through a consumer of its own. The first start of
    /// this release goes on from where the consumer every replica shared had got, so no
    /// result is missed across the upgrade; a restart keeps its place.
    #[tokio::test]
    async fn each_replica_has_a_results_consumer_that_goes_on_from_the_shared_one() {
        let nats = fleet_testkit::NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let subjects = Subjects::default();
        let stream = js
            .create_stream(subjects.results_stream_config())
            .await
            .unwrap();
        let publish = async |id: &str| {
            js.publish(subjects.result(id), "{}".into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        };
        let first_seq = |c: consumer::Consumer<consumer::pull::Config>| async move {
            let mut batch = c.fetch().max_messages(1).messages().await.unwrap();
            let m = batch.next().await.unwrap().unwrap();
            m.ack().await.unwrap();
            m.info().unwrap().stream_sequence
        };
        let wait = Duration::from_secs(10);

        // No shared consumer: a new replica starts at the next result.
        publish("before").await;
        let a = results_consumer(&stream, &subjects, "aaaaaaaaaaaaaaaa", wait, 8)
            .await
            .unwrap();
        let next = publish("after").await;
        assert_eq!(first_seq(a).await, next);

        // The older release's shared consumer acked the first two of three results.
        let shared = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(SHARED_RESULTS_CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        let third = publish("third").await;
        let mut batch = shared.fetch().max_messages(3).messages().await.unwrap();
        for _ in 0..2 {
            batch.next().await.unwrap().unwrap().ack().await.unwrap();
        }
        // Two of the three, acked: wait until the server has both acks.
        let floor_at = async || {
            let info = stream.consumer_info(SHARED_RESULTS_CONSUMER).await.unwrap();
            info.ack_floor.stream_sequence
        };
        let deadline = std::time::Instant::now() + wait;
        while floor_at().await < third - 1 {
            assert!(std::time::Instant::now() < deadline, "acks not seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let b = results_consumer(&stream, &subjects, "bbbbbbbbbbbbbbbb", wait, 8)
            .await
            .unwrap();
        assert_eq!(
            first_seq(b).await,
            third,
            "on from the shared consumer's ack floor"
        );
        // A restart finds its consumer where it left it.
        let b = results_consumer(&stream, &subjects, "bbbbbbbbbbbbbbbb", wait, 8)
            .await
            .unwrap();
        let after = publish("later").await;
        assert_eq!(first_seq(b).await, after);
        let info = stream
            .consumer_info(results_consumer_name("bbbbbbbbbbbbbbbb"))
            .await
            .unwrap();
        assert_eq!(
            info.config.inactive_threshold,
            fleet_worker::protocol::RESULTS_MAX_AGE
        );
    }

    /// A look serves 10 s while the budget ledger counts what it found; while the ledger
    /// counts a replica more (one that just started) or fewer (one that just stopped), it
    /// is made again after half a second. Before, a replica that started was not asked
    /// for records or listings for up to 10 s.
    #[test]
    fn a_look_the_ledger_disagrees_with_is_made_again_soon() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert!(!look_is_fresh(None, 0, None), "no look yet");
        assert!(!look_is_fresh(None, 0, Some(1)));
        // Agreeing (or with no ledger to follow): 10 s.
        for counted in [None, Some(2)] {
            assert!(look_is_fresh(Some(s(9)), 1, counted));
            assert!(!look_is_fresh(Some(s(10)), 1, counted));
        }
        // Disagreeing: half a second, either way.
        for (running, counted) in [(0, 2), (1, 1), (2, 2)] {
            assert!(look_is_fresh(Some(ms(499)), running, Some(counted)));
            assert!(!look_is_fresh(Some(ms(500)), running, Some(counted)));
        }
        assert!(!look_is_fresh(Some(s(1)), usize::MAX, Some(i64::MAX)));
    }
}

/// Signing in and TLS against real servers that require them.
#[cfg(test)]
mod auth_tests {
    use super::*;
    use crate::config::NatsConfig;

    async fn connect_to(
        url: &str,
        auth: &Auth,
        timeout: Duration,
    ) -> Result<Connection, BrokerError> {
        let dir = tempfile::tempdir().unwrap();
        connect(
            Some(url),
            auth,
            "127.0.0.1:1".parse().unwrap(),
            false,
            dir.path(),
            timeout,
        )
        .await
    }

    /// `nats://127.0.0.1:<port>` with user info put in.
    fn with_user_info(url: &str, info: &str) -> String {
        url.replacen("nats://", &format!("nats://{info}@"), 1)
    }

    #[tokio::test]
    async fn a_user_and_password_from_the_config_or_the_url_and_a_wrong_one_said_why() {
        let nats = fleet_testkit::NatsServer::start_with_config(
            "authorization { user: alice, password: \"pw s3cret\" }",
        )
        .unwrap();
        let auth = Auth::new(
            SignIn::UserPassword("alice".into(), "pw s3cret".into()),
            None,
            None,
        );
        let conn = connect_to(nats.url(), &auth, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(conn.client.server_info().jetstream);

        // In the URL, percent-encoded, as the Go and Python clients take it; never logged.
        let url = with_user_info(nats.url(), "alice:pw%20s3cret");
        let conn = connect_to(&url, &Auth::default(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!conn.url.contains("s3cret"), "{}", conn.url);
        assert!(conn.url.contains("***@127.0.0.1"), "{}", conn.url);

        let wrong = Auth::new(
            SignIn::UserPassword("alice".into(), "guess".into()),
            None,
            None,
        );
        let err = connect_to(&url, &wrong, Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("authorization violation"), "says why: {err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = connect_to(nats.url(), &Auth::default(), Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("authorization violation"), "{err}");
    }

    #[tokio::test]
    async fn a_token_from_its_variable_and_an_nkey_seed_from_its_file() {
        let nats =
            fleet_testkit::NatsServer::start_with_config("authorization { token: t0ken-42 }")
                .unwrap();
        let env = |var: &str| (var == "FLEET_TEST_NATS_TOKEN").then(|| "t0ken-42".to_string());
        let config = NatsConfig {
            token_env: Some("FLEET_TEST_NATS_TOKEN".into()),
            ..NatsConfig::default()
        };
        let auth = config.auth_from(env).unwrap();
        assert!(
            !format!("{auth:?}").contains("t0ken"),
            "Debug shows no secret"
        );
        connect_to(nats.url(), &auth, Duration::from_secs(10))
            .await
            .unwrap();
        let unset = NatsConfig {
            token_env: Some("FLEET_TEST_NATS_TOKEN_UNSET".into()),
            ..NatsConfig::default()
        };
        let err = unset.auth_from(env).unwrap_err().to_string();
        assert!(
            err.contains("FLEET_TEST_NATS_TOKEN_UNSET is unset"),
            "{err}"
        );

        let user = nkeys::KeyPair::new_user();
        let nats = fleet_testkit::NatsServer::start_with_config(&format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let seed_file = dir.path().join("user.nk");
        std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();
        let config = NatsConfig {
            nkey_seed_file: Some(seed_file.clone()),
            ..NatsConfig::default()
        };
        connect_to(nats.url(), &config.auth().unwrap(), Duration::from_secs(10))
            .await
            .unwrap();
        std::fs::write(&seed_file, "not a seed").unwrap();
        let err = config.auth().unwrap_err().to_string();
        assert!(err.contains("holds no NKey seed"), "{err}");
    }

    /// A private CA, and a server certificate it signed for 127.0.0.1, made with the
    /// `openssl` command line tool into `dir`.
    fn private_ca(dir: &Path) {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=fleet test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
    }

    #[tokio::test]
    async fn tls_with_a_private_ca_is_verified_against_the_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        private_ca(dir.path());
        let p = |f: &str| dir.path().join(f);
        let nats = fleet_testkit::NatsServer::start_with_config(&format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}",
            p("server.pem"),
            p("server.key")
        ))
        .unwrap();
        let config = NatsConfig {
            tls_ca_file: Some(p("ca.pem")),
            ..NatsConfig::default()
        };
        let conn = connect_to(nats.url(), &config.auth().unwrap(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(conn.client.server_info().tls_required);
        // Without the CA the server's certificate is not trusted.
        let err = connect_to(nats.url(), &Auth::default(), Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not connected"), "{err}");
        let missing = NatsConfig {
            tls_ca_file: Some(p("nowhere.pem")),
            ..NatsConfig::default()
        };
        let err = missing.auth().unwrap_err().to_string();
        assert!(err.contains("nats.tls_ca_file: cannot read"), "{err}");
    }
}

/// A JetStream key-value bucket the commander keeps.
#[derive(Clone, Copy, Debug)]
pub struct KvBucket<'a> {
    pub name: &'a str,
    pub description: &'a str,
    /// Revisions kept per key.
    pub history: i64,
    /// Stream replicas (`nats.replicas`).
    pub replicas: usize,
    /// How long a key is kept after its last write; zero: for good.
    pub max_age: Duration,
}

/// Opens a key-value bucket, creating its stream when missing. The stream is made by hand
/// because `create_key_value` fails client-side on 2.9.10 (STANDARDS B.3).
pub async fn open_kv(
    js: &jetstream::Context,
    b: KvBucket<'_>,
) -> Result<jetstream::kv::Store, String> {
    if let Ok(kv) = js.get_key_value(b.name).await {
        return Ok(kv);
    }
    let cfg = jetstream::stream::Config {
        name: format!("KV_{}", b.name),
        description: Some(b.description.into()),
        subjects: vec![format!("$KV.{}.>", b.name)],
        max_messages_per_subject: b.history,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        storage: jetstream::stream::StorageType::File,
        num_replicas: b.replicas,
        max_age: b.max_age,
        ..Default::default()
    };
    js.get_or_create_stream(cfg)
        .await
        .map_err(|e| e.to_string())?;
    js.get_key_value(b.name).await.map_err(|e| e.to_string())
}

/// How often the other replicas are looked for, at most, while the budget ledger's count
/// agrees with the last look.
pub const OTHERS_LOOK_EVERY: Duration = Duration::from_secs(10);

/// How often they are looked for, at most, while it does not.
pub const OTHERS_RELOOK_EVERY: Duration = Duration::from_millis(500);

/// Whether other commander replicas run, and how many: their results consumers
/// (`commander-results-<replica>`) have a pull request waiting. A replica that stopped
/// leaves its consumer behind, idle, so that is not enough. One look serves everything
/// that asks (record lookups, listings, the OTLP relay) for [`OTHERS_LOOK_EVERY`], or
/// for [`OTHERS_RELOOK_EVERY`] while the replicas the budget ledger counts are not this
/// look's: the ledger hears of a replica within moments of its start or clean stop
/// (`policy::ledger_share`), so a replica that joins is asked at once, not 10 s later.
#[derive(Debug)]
pub struct OtherReplicas {
    js: jetstream::Context,
    subjects: Subjects,
    replica: String,
    running: std::sync::atomic::AtomicUsize,
    /// When the last look was made.
    looked: std::sync::Mutex<Option<Instant>>,
    /// The replicas the budget ledger counts, this one included (`fleet_replicas`), once
    /// [`OtherReplicas::follow`] gave it.
    counted: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
}

impl OtherReplicas {
    pub fn new(js: &jetstream::Context, subjects: &Subjects, replica: &str) -> Self {
        Self {
            js: js.clone(),
            subjects: subjects.clone(),
            replica: replica.to_string(),
            running: Default::default(),
            looked: Default::default(),
            counted: Default::default(),
        }
    }

    /// Follows `counted`, the replicas the budget ledger counts (itself included).
    pub fn follow(&self, counted: prometheus_client::metrics::gauge::Gauge) {
        let _ = self.counted.set(counted);
    }

    /// This replica's id: the one the looks leave out.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// What the last look found (no I/O; false before the first).
    pub fn last_known(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// What the last look found, looking again when it is older than
    /// [`OTHERS_LOOK_EVERY`].
    pub async fn run(&self) -> bool {
        self.count().await > 0
    }

    /// How many other replicas run, as [`OtherReplicas::run`] looks.
    pub async fn count(&self) -> usize {
        let running = self.running.load(std::sync::atomic::Ordering::Relaxed);
        let age = self
            .looked
            .lock()
            .ok()
            .and_then(|l| *l)
            .map(|at| at.elapsed());
        if look_is_fresh(age, running, self.counted.get().map(|g| g.get())) {
            return running;
        }
        self.look_now().await;
        self.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Looks now: whether another replica runs.
    pub async fn look_now(&self) -> bool {
        use futures::StreamExt;
        let mut running = 0;
        if let Ok(stream) = self
            .js
            .get_stream_no_info(self.subjects.results_stream())
            .await
        {
            let prefix = results_consumer_name("");
            let own = results_consumer_name(&self.replica);
            let mut consumers = stream.consumers();
            while let Some(Ok(info)) = consumers.next().await {
                if info.name.starts_with(&prefix) && info.name != own && info.num_waiting > 0 {
                    running += 1;
                }
            }
        }
        self.running
            .store(running, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut l) = self.looked.lock() {
            *l = Some(Instant::now());
        }
        running > 0
    }
}

/// Whether a look at the other replicas made `age` ago (none yet: `None`), which found
/// `running`, still serves: for [`OTHERS_LOOK_EVERY`] while the replicas the budget
/// ledger counts (`counted`, this one included) are those it found, else for
/// [`OTHERS_RELOOK_EVERY`].
fn look_is_fresh(age: Option<Duration>, running: usize, counted: Option<i64>) -> bool {
    let agrees =
        counted.is_none_or(|c| i64::try_from(running).is_ok_and(|n| c == n.saturating_add(1)));
    age.is_some_and(|a| a < OTHERS_LOOK_EVERY && (agrees || a < OTHERS_RELOOK_EVERY))
}

/// The control bucket on a nats-server of a test (`detect::shared`, `detect::lead`).
#[cfg(test)]
pub async fn control_bucket_for_tests(url: &str) -> jetstream::kv::Store {
    let js = jetstream::new(async_nats::connect(url).await.expect("nats"));
    let bucket = KvBucket {
        name: "fleet_control",
        description: "test",
        history: crate::detect::shared::HISTORY,
        replicas: 1,
        max_age: Duration::ZERO,
    };
    open_kv(&js, bucket).await.expect("control bucket")
}
