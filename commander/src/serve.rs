//! `commander serve`: connect, set up streams, start the loops and the API, and shut down
//! cleanly on SIGTERM / Ctrl-C (finish the batch in hand, flush the store, stop the child
//! nats-server if we started one).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use fleet_worker::span::{AttrValue, ExportConfig, SpanExporter};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::broker::{self, BrokerError};
use crate::classify::rubric::{CheckAgainst, Rubric, RubricError};
use crate::classify::{CallHook, CallRecord, Classifier, ClassifierError};
use crate::config::Config;
use crate::decisions::{DecisionLog, DecisionLogError};
use crate::fleet::{self, FleetHandle, FleetState, TaskEvent};
use crate::ingest::{self, Ingestor, otlp};
use crate::metrics::Metrics;
use crate::pipeline::{self, Ctx};
use crate::policy;
use crate::registry::{Registry, RegistryError};
use crate::route::RoutingTable;
use crate::store::{Store, StoreError};
use crate::supervise::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot open the store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("stopped because the store can write nothing more until it is reopened: {0}")]
    StoreFailed(String),
    #[error("model registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("routing rubric: {0}")]
    Rubric(#[from] RubricError),
    #[error(transparent)]
    Classifier(#[from] ClassifierError),
    #[error("decision log: {0}")]
    Decisions(#[from] DecisionLogError),
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("alert sinks: {0}")]
    Sinks(#[from] crate::detect::sinks::SinkError),
    #[error("trace store: {0}")]
    TraceStore(#[from] crate::traces::store::TraceStoreError),
    #[error("trace export: {0}")]
    TraceExport(#[from] crate::traces::export::ExportError),
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve the API on {addr} in local mode: no [[auth.tokens]] are configured, so anyone who reaches it could read and control the fleet. Configure tokens (docs/api.md, \"Roles\"), bind a loopback address, or set auth.allow_remote_without_tokens = true"
    )]
    LocalModeRemote { addr: String },
}

/// Local mode (no tokens) serves loopback only, unless the config says otherwise.
fn check_local_mode(config: &Config) -> Result<(), ServeError> {
    let ip = config.http.listen.ip();
    if config.auth.resolve().is_empty()
        && !ip.is_loopback()
        && !config.auth.allow_remote_without_tokens
    {
        return Err(ServeError::LocalModeRemote {
            addr: config.http.listen.to_string(),
        });
    }
    Ok(())
}

/// A store error as the serve error that names the data directory.
fn in_store(config: &Config) -> impl FnOnce(StoreError) -> ServeError + use<> {
    let dir = config.store.data_dir.display().to_string();
    move |source| ServeError::Store { dir, source }
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    check_local_mode(&config)?;
    let open_files = crate::httpd::raise_open_files();
    // Three servers (the API, OTLP/HTTP, OTLP/gRPC) may each hold max_connections; the
    // store, NATS and the rest need a few hundred more.
    let wanted = 3 * config.http.max_connections as u64 + 1024;
    match open_files {
        Some(n) if n < wanted => tracing::warn!(
            open_files = n,
            max_connections = config.http.max_connections,
            "the open-file limit is below what http.max_connections lets clients hold on the three servers (plus about 1,000 for the store and NATS): raise the limit (ulimit -n, LimitNOFILE=) or lower http.max_connections"
        ),
        n => tracing::info!(open_files = ?n, "open-file limit"),
    }
    let data_dir = config.store.data_dir.clone();
    let store = Store::open_with_cache(
        &data_dir.join("sled"),
        config.store.cache_mib.saturating_mul(1 << 20),
    )
    .map_err(in_store(&config))?;
    let auth = config.nats.auth()?;
    let conn = broker::connect(
        config.nats.url.as_deref(),
        &auth,
        config.nats.local_default,
        config.nats.auto_start,
        &data_dir,
        Duration::from_millis(config.nats.connect_timeout_ms),
    )
    .await?;
    let result = run(config, store, &conn).await;
    if let Some(child) = conn.child {
        child.stop().await;
    }
    result
}

/// The start-up order, top to bottom: the broker and streams, the live snapshot, the fleet
/// owner and classifier, telemetry, policies, the task path, the API; then the shutdown.
/// Each step is a named function; what is left here is the wiring between them, kept in
/// one place so the order stays visible.
async fn run(config: Config, store: Store, conn: &broker::Connection) -> Result<(), ServeError> {
    let client = &conn.client;
    broker::check_server(client, &conn.url)?;
    let subjects = config.subjects();
    let js = jetstream_context(client, &config);
    let (streams, replica) = set_up_streams(&config, &js, &subjects, &store).await?;
    let instance = format!("commander-{}", std::process::id());
    let metrics = Arc::new(Metrics::default());
    let supervisor = Supervisor::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    // The one live snapshot starts from the config's routing table, the registry and the
    // rubric as loaded here (a bad file refuses to start) and the built-in policy; the
    // bucket or the policy directory replace the policy once they are read.
    let engine = open_engine(&config, &store)?;
    let mut registry = metrics.registry();
    supervisor.register(&mut registry);
    store.register(&mut registry);
    let (fleet, fleet_task) = start_fleet(&config, &engine, &supervisor, &stop_rx, &mut registry);
    let wiring = Wiring {
        config: &config,
        client,
        telemetry: &conn.telemetry,
        js: &js,
        subjects: &subjects,
        supervisor: &supervisor,
        stop: &stop_rx,
        replica: &replica,
        others: Arc::new(broker::OtherReplicas::new(&js, &subjects, &replica)),
        leading: Default::default(),
    };
    let (traces, tap, mut telemetry_tasks) =
        start_traces(&wiring, &store, (&engine, &fleet), &mut registry)?;
    let (spans, spans_task) = own_spans(&conn.telemetry, &subjects, &instance, tap.clone());
    let classifier =
        start_classifier(&config, &engine, (&spans, &fleet, &instance), &mut registry)?;
    telemetry_tasks.extend(start_telemetry(&wiring, tap, &metrics, &fleet, &mut registry).await?);

    let (events, decisions) = open_decision_log(&store, &mut registry, config.http.max_streams)?;
    let policies = start_policy(
        &wiring,
        &engine,
        &instance,
        &mut registry,
        &mut telemetry_tasks,
    )
    .await?;
    let (alerts, ledger) = start_detection(
        &wiring,
        (&store, &decisions, &traces.flags, &events),
        (&fleet, &engine),
        &mut registry,
        &mut telemetry_tasks,
    )
    .await?;
    let (auth, control) = start_operator_surface(
        &wiring,
        &store,
        (&engine, &fleet, &alerts, &events),
        policies.compliance_token.clone(),
        &mut registry,
        &mut telemetry_tasks,
    )?;
    let registry = Arc::new(registry);

    let core = pipeline::Core {
        store: store.clone(),
        metrics: metrics.clone(),
        fleet: fleet.clone(),
        classifier: classifier.clone(),
        decisions: decisions.clone(),
        policy: engine.clone(),
        route_cache: Default::default(),
        traces,
        replica: Arc::from(replica.as_str()),
    };
    let ctx = Arc::new(task_path_ctx(&wiring, core.clone(), spans.clone()).await?);
    let task_path = start_task_path(&wiring, &ctx, streams, &engine);

    let ready = Arc::new(AtomicBool::new(true));
    let state = AppState {
        core,
        // The API answers 503 at once and lets its caller retry (docs/api.md).
        intake: Arc::new(
            fleet_worker::Producer::new(client.clone(), subjects.clone())
                .with_retry_for(Duration::ZERO),
        ),
        policies: policies.sync.clone(),
        peers: Arc::new(nats_peers(&wiring)),
        alerts,
        registry,
        ready: ready.clone(),
        max_body_bytes: config.http.max_body_bytes,
        compliance_token: policies.compliance_token,
        supervisor: supervisor.clone(),
        auth,
        events,
        control,
    };
    telemetry_tasks.push(answer_other_replicas(&wiring, &state));
    let limits = config.http.connection_limits();
    serve_api_until_signal(config.http.listen, limits, state, store_failure(&store)).await?;
    let failure = store.failure();
    ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    telemetry_tasks.push(fleet_task);
    let running = Running {
        task_path,
        telemetry: telemetry_tasks,
        source_watches: policies.source_watches,
        store,
        spans,
        spans_task,
        ledger,
        ctx,
    };
    shut_down(&config, running, client).await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), |reason| Err(ServeError::StoreFailed(reason)))
}

/// The JetStream context of the task path (and of the streams' and buckets' setup),
/// bounded by the PubAcks the task path may await at once
/// ([`pipeline::max_pending_acks`]) instead of async-nats' 5,000.
fn jetstream_context(client: &async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(pipeline::max_pending_acks(config.intake.batch_size))
        .build(client.clone())
}

/// Resolves once the store can write nothing more, logging what to do: the commander then
/// stops as on SIGTERM and exits 1 (`Store::failure` says why).
fn store_failure(store: &Store) -> impl std::future::Future<Output = ()> + Send + use<> {
    let failing = store.clone();
    async move {
        let reason = failing.failed().await;
        tracing::error!(error = %reason, "the store can write nothing more until it is reopened: stopping. Fix the cause (disk space, permissions) and start the commander again: it reopens the store from what is on disk, and JetStream hands out again every task not yet acknowledged");
    }
}

/// The live event hub (its counters registered) and the decision log, which publishes to it.
fn open_decision_log(
    store: &Store,
    registry: &mut prometheus_client::registry::Registry,
    max_streams: usize,
) -> Result<(crate::events::Hub, DecisionLog), ServeError> {
    let events = crate::events::Hub::new(4096, 1024, max_streams);
    events.counters().register(registry);
    let decisions = DecisionLog::open(store)?.with_events(events.clone());
    Ok((events, decisions))
}

/// The classifier against the live rubric, its calls reported as the commander's spans and
/// in the fleet's cost ledger (`classifier_hook`); its counters registered.
fn start_classifier(
    config: &Config,
    engine: &policy::PolicyEngine,
    (spans, fleet, instance): (&SpanExporter, &FleetHandle, &str),
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Arc<Classifier>, ServeError> {
    let classifier = Arc::new(Classifier::new(
        config.classifier.clone(),
        &engine.live().rubric,
        Some(classifier_hook(spans.clone(), fleet.clone(), instance)),
    )?);
    classifier.counters.register(registry);
    Ok(classifier)
}

/// The live fleet state's owner, reading prices from the live snapshot; its counters
/// registered.
fn start_fleet(
    config: &Config,
    engine: &Arc<policy::PolicyEngine>,
    supervisor: &Supervisor,
    stop: &watch::Receiver<bool>,
    registry: &mut prometheus_client::registry::Registry,
) -> (FleetHandle, tokio::task::JoinHandle<()>) {
    let state = FleetState::new(
        config.fleet.clone(),
        engine.clone(),
        config.pools.keys().map(String::as_str),
    );
    let (fleet, task) = fleet::spawn(
        state,
        config.telemetry.queue_batches,
        engine.clock.clone(),
        stop.clone(),
        supervisor.clone(),
    );
    fleet.counters.register(registry);
    (fleet, task)
}

// A replica that takes the lead exports the traces it kept in the last `STANDBY_FOR`: that
// must cover the time the lease takes to change hands after its holder died.
const _: () = assert!(
    crate::traces::export::STANDBY_FOR.as_millis()
        >= 2 * (crate::detect::lead::EXPIRES.as_millis() + crate::detect::lead::RENEW.as_millis())
);

/// What `start_traces` gives the rest: the handle, the tap for ingest, the tasks.
type StartedTraces = (
    crate::traces::Traces,
    Option<crate::ingest::TraceTap>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// The trace keeper (docs/traces.md): its store, its exporters, the tap ingest feeds it
/// through, and its task. Off (`[traces] enabled = false`): no tap, no store.
fn start_traces(
    w: &Wiring<'_>,
    store: &Store,
    (engine, fleet): (&Arc<policy::PolicyEngine>, &FleetHandle),
    registry: &mut prometheus_client::registry::Registry,
) -> Result<StartedTraces, ServeError> {
    use crate::traces;
    let (t, stop) = (&w.config.traces, w.stop);
    let flags = traces::flags::Flags::default();
    if !t.enabled {
        let off = traces::Traces { store: None, flags };
        return Ok((off, None, Vec::new()));
    }
    let trace_store = traces::store::TraceStore::open(store)?;
    let counters = Arc::new(traces::TraceCounters::default());
    counters.register(registry);
    let mut tasks = Vec::new();
    let mut exporters = Vec::new();
    for e in &t.export {
        let (x, task) = traces::export::spawn(e, counters.export.clone(), stop.clone())?;
        exporters.push(x);
        tasks.push(task);
    }
    let (tap, rx) = crate::ingest::TraceTap::new(t.queue_batches, t.queue_bytes);
    let wiring = Arc::new(traces::Wiring {
        config: t.clone(),
        store: trace_store.clone(),
        engine: engine.clone(),
        flags: flags.clone(),
        exporters,
        counters,
        clock: engine.clock.clone(),
        shed: tap.shed_spans.clone(),
        leading: w.leading.clone(),
    });
    // The keeper's work is synchronous (assembling, sampling, sled writes) and comes in
    // bursts: at 5,000 tasks/s one tick in ten took over 3 ms, the longest 28 ms. On a
    // runtime worker that held up whatever was queued behind it there, intake batches
    // among them; on its own thread it only competes for the CPU, which the OS shares out.
    tasks.push(spawn_on_own_thread(
        "trace-keeper",
        traces::run(wiring, fleet.clone(), rx, stop.clone()),
    )?);
    let handle = traces::Traces {
        store: Some(trace_store),
        flags,
    };
    Ok((handle, Some(tap), tasks))
}

/// Runs `work` on a thread of its own, on a single-threaded runtime for its timers and
/// channels; the handle resolves when it ends, as `tokio::spawn`'s does.
fn spawn_on_own_thread(
    name: &'static str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let thread = |source| ServeError::Thread { name, source };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(thread)?;
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            rt.block_on(work);
            // Dropped unsent if `work` panics: the handle resolves either way.
            let _ = done.send(());
        })
        .map_err(thread)?;
    Ok(tokio::spawn(async move {
        let _ = ended.await;
    }))
}

/// The detector's loop (added to `tasks`): the fleet snapshot and the policy's `[alerts]`
/// in, alerts out to the alert log, `<prefix>.alerts.<severity>` and the gauges.
async fn start_detection(
    w: &Wiring<'_>,
    (store, decisions, trace_flags, events): (
        &Store,
        &DecisionLog,
        &crate::traces::flags::Flags,
        &crate::events::Hub,
    ),
    (fleet, engine): (&FleetHandle, &Arc<policy::PolicyEngine>),
    registry: &mut prometheus_client::registry::Registry,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<
    (
        crate::detect::run::Alerts,
        Arc<policy::ledger_share::LedgerShare>,
    ),
    ServeError,
> {
    let d = &w.config.detect;
    let log = crate::detect::AlertLog::open(store, d.max_records).map_err(in_store(w.config))?;
    let generator = format!("http://{}", w.config.http.listen);
    let (sinks, sink_tasks) = crate::detect::sinks::Sinks::start(
        &d.sinks,
        &generator,
        engine.clock.clone(),
        w.stop.clone(),
    )?;
    tasks.extend(sink_tasks);
    let silences = crate::detect::silence::Silences::open(store).map_err(in_store(w.config))?;
    let interventions = crate::detect::act::InterventionLog::open(store, d.max_records)
        .map_err(in_store(w.config))?
        .with_events(events.clone());
    interventions.counters.register(registry);
    let mut alerts = crate::detect::run::Alerts::new(log, sinks, silences, interventions);
    alerts.counters.register(registry);
    let (share, leading, ledger) =
        share_with_replicas(w, store, engine, &alerts, registry, tasks).await?;
    alerts.shared = Some(share);
    let wiring = Arc::new(crate::detect::run::Wiring {
        alerts: alerts.clone(),
        fleet: fleet.clone(),
        engine: engine.clone(),
        decisions: decisions.clone(),
        client: w.client.clone(),
        subjects: w.subjects.clone(),
        clock: engine.clock.clone(),
        // Once per `interval_ms` of fleet time, which a lab's `[clock]` compresses.
        interval: Duration::from_millis(d.interval_ms.max(1)).div_f64(engine.clock.speed()),
        max_open: d.max_open,
        trace_flags: trace_flags.clone(),
        leading,
    });
    let stop = w.stop.clone();
    tasks.push(w.supervisor.spawn("detect", w.stop.clone(), move || {
        crate::detect::run::run(wiring.clone(), stop.clone())
    }));
    Ok((alerts, ledger))
}

/// What replicas share through the `<prefix>_control` bucket: the operator's interventions
/// and cost cap (`detect::shared`), what each has committed of the budgets
/// (`policy::ledger_share`), and the lease that makes one replica the one that notifies
/// alerts (`detect::lead`). All run until `w.stop`, in `tasks`.
async fn share_with_replicas(
    w: &Wiring<'_>,
    store: &Store,
    engine: &Arc<policy::PolicyEngine>,
    alerts: &crate::detect::run::Alerts,
    registry: &mut prometheus_client::registry::Registry,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<
    (
        Arc<crate::detect::shared::Share>,
        crate::detect::lead::Leading,
        Arc<policy::ledger_share::LedgerShare>,
    ),
    ServeError,
> {
    use crate::detect::{lead, shared};
    let name = shared::bucket_name(w.subjects.prefix());
    let bucket = broker::KvBucket {
        name: &name,
        description: "fleet commander: the operator's interventions and cost cap in force, each replica's budget spending, and who notifies alerts",
        history: shared::HISTORY,
        replicas: w.config.nats.replicas,
        max_age: Duration::ZERO,
    };
    let in_nats = kv_refused(&name);
    let kv = open_bucket(w, bucket).await?;
    let share = shared::Share::start(shared::Parts {
        kv: kv.clone(),
        log: alerts.interventions.clone(),
        engine: engine.clone(),
        kick: alerts.kick.clone(),
        replica: w.replica.to_string(),
        seen: store.tree("operator_shared").map_err(in_store(w.config))?,
        silences: alerts.silences.clone(),
        seen_silences: store.tree("silences_shared").map_err(in_store(w.config))?,
        cap_unshared: store
            .tree("cost_cap_unshared")
            .map_err(in_store(w.config))?,
    })
    .await
    .map_err(&in_nats)?;
    registry.register(
        "operator_changes_unshared",
        "Operator changes not handed to the other replicas because too many were waiting",
        share.dropped.clone(),
    );
    let ledger = policy::ledger_share::LedgerShare::start(kv.clone(), engine.clone(), w.replica)
        .await
        .map_err(in_nats)?;
    registry.register(
        "budget_cells_unshared",
        "Budget cells the last write to the other replicas left out (more than a key holds)",
        ledger.unshared.clone(),
    );
    registry.register(
        "replicas",
        "Commander replicas sharing the intake as this one counts them, itself included (each throttle's rate is divided among them)",
        ledger.replicas.clone(),
    );
    // The ledger hears of a replica that starts or stops cleanly within moments: the
    // looks for the other replicas follow it.
    w.others.follow(ledger.replicas.clone());
    tasks.push(w.supervisor.spawn("ledger_share", w.stop.clone(), {
        let (stop, ledger) = (w.stop.clone(), ledger.clone());
        move || ledger.clone().run(stop.clone())
    }));
    let lease = Arc::new(lead::Lease::new(kv, w.replica, w.leading.clone()));
    let leading = lease.leading.clone();
    let (s, l, stop) = (share.clone(), lease, w.stop.clone());
    tasks.push(w.supervisor.spawn("operator_share", w.stop.clone(), {
        let stop = stop.clone();
        move || s.clone().run(stop.clone())
    }));
    tasks.push(w.supervisor.spawn("alert_lead", w.stop.clone(), move || {
        l.clone().run(stop.clone())
    }));
    Ok((share, leading, ledger))
}

/// The operator's surface: the tokens and roles, the control plane (its audit, its rate
/// limit, and how it reaches workers over NATS) and the live stream's once-a-second feed.
fn start_operator_surface(
    w: &Wiring<'_>,
    store: &Store,
    (engine, fleet, alerts, events): (
        &Arc<policy::PolicyEngine>,
        &FleetHandle,
        &crate::detect::run::Alerts,
        &crate::events::Hub,
    ),
    compliance_token: Option<String>,
    registry: &mut prometheus_client::registry::Registry,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(crate::api::auth::Keys, crate::api::control::Control), ServeError> {
    let auth = crate::api::auth::Keys::new(w.config.auth.resolve(), compliance_token);
    if auth.local_mode() {
        tracing::warn!(
            listen = %w.config.http.listen,
            "LOCAL MODE: no [[auth.tokens]] configured; every caller of the API may read and control the fleet (docs/api.md, \"Roles\")"
        );
    } else {
        tracing::info!(tokens = ?auth, "API roles in force");
    }
    let tell = Arc::new(NatsTell(pipeline::cancel::WorkQueue {
        client: w.client.clone(),
        js: w.js.clone(),
        subjects: w.subjects.clone(),
        replica: w.replica.to_string(),
    }));
    let control = crate::api::control::Control::open(
        store,
        &w.config.auth,
        w.config.http.max_control_sockets,
        tell,
    )
    .map_err(in_store(w.config))?;
    control.counters.register(registry);
    let (hub, fleet, alerts, engine) = (
        events.clone(),
        fleet.clone(),
        alerts.clone(),
        engine.clone(),
    );
    let stop = w.stop.clone();
    tasks.push(w.supervisor.spawn("stream feed", w.stop.clone(), move || {
        crate::api::stream::feed(
            hub.clone(),
            fleet.clone(),
            alerts.clone(),
            engine.clone(),
            stop.clone(),
        )
    }));
    Ok((auth, control))
}

/// The control plane's way to a worker (a NATS request on `<prefix>.control.<worker>`)
/// and to a pool's queue (the work stream).
#[derive(Debug)]
struct NatsTell(pipeline::cancel::WorkQueue);

impl crate::api::control::Tell for NatsTell {
    fn tell<'a>(
        &'a self,
        worker: &'a str,
        req: fleet_worker::control::ControlRequest,
    ) -> futures::future::BoxFuture<'a, Result<fleet_worker::control::ControlReply, String>> {
        Box::pin(async move {
            crate::detect::act::request(&self.0.client, &self.0.subjects, worker, &req).await
        })
    }

    fn withdraw<'a>(
        &'a self,
        task: &'a pipeline::cancel::Queued,
        reason: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<pipeline::cancel::Withdrawn, pipeline::cancel::WithdrawError>,
    > {
        Box::pin(self.0.withdraw(task, reason))
    }

    fn withdraw_pool<'a>(
        &'a self,
        pool: &'a str,
        reason: &'a str,
        max: usize,
    ) -> futures::future::BoxFuture<
        'a,
        Result<pipeline::cancel::PoolWithdrawal, pipeline::cancel::WithdrawError>,
    > {
        Box::pin(self.0.withdraw_pool(pool, reason, max))
    }
}

/// The other replicas, as the API asks them for records and sends cancels on.
fn nats_peers(w: &Wiring<'_>) -> crate::api::peers::NatsPeers {
    crate::api::peers::NatsPeers::new(w.client.clone(), w.subjects.clone(), w.others.clone())
}

/// Answers the other replicas' record lookups and carries out the cancels they send on
/// (`api::peers::answer_lookups`).
fn answer_other_replicas(w: &Wiring<'_>, state: &AppState) -> tokio::task::JoinHandle<()> {
    let (st, c, stop) = (state.clone(), w.client.clone(), w.stop.clone());
    let subjects = w.subjects.clone();
    w.supervisor
        .spawn("record_lookups", w.stop.clone(), move || {
            crate::api::peers::answer_lookups(st.clone(), c.clone(), subjects.clone(), stop.clone())
        })
}

/// The task path's context: the shared core plus its side of NATS, the budget notices'
/// bucket (`pipeline::notices`) among it.
async fn task_path_ctx(
    w: &Wiring<'_>,
    core: pipeline::Core,
    spans: SpanExporter,
) -> Result<Ctx, ServeError> {
    let targets = pipeline::retarget::Targets::open(&core.store).map_err(in_store(w.config))?;
    let name = pipeline::notices::bucket_name(w.subjects.prefix());
    let notices = open_bucket(
        w,
        broker::KvBucket {
            name: &name,
            description: "fleet commander: the budget notices sent, each once for the fleet",
            history: 1,
            replicas: w.config.nats.replicas,
            max_age: pipeline::notices::MAX_AGE,
        },
    )
    .await?;
    Ok(Ctx {
        core,
        client: w.client.clone(),
        js: w.js.clone(),
        subjects: w.subjects.clone(),
        spans,
        publish_decisions: w.config.decisions.publish,
        reply_prefixes: w.config.intake.reply_prefixes.clone(),
        intake_ack_wait: w.config.intake.ack_wait(),
        // The intake consumer's window is 8 × the batch (broker::ensure_streams).
        throttle_inline_cap: w.config.intake.batch_size.saturating_mul(2),
        targets,
        notices,
    })
}

/// Opens (or creates) a key-value bucket; NATS's refusal names it.
async fn open_bucket(
    w: &Wiring<'_>,
    bucket: broker::KvBucket<'_>,
) -> Result<async_nats::jetstream::kv::Store, ServeError> {
    let name = bucket.name.to_string();
    broker::open_kv(w.js, bucket)
        .await
        .map_err(kv_refused(&name))
}

/// A key-value bucket's setup error, as the serve error that names it.
fn kv_refused(name: &str) -> impl Fn(String) -> ServeError + use<> {
    let name = format!("key-value bucket {name}");
    move |reason| {
        ServeError::Broker(BrokerError::Setup {
            name: name.clone(),
            reason,
        })
    }
}

/// The intake, work and results streams and their consumers, created or checked, and this
/// replica's id (the store's), which names its results consumer.
async fn set_up_streams(
    config: &Config,
    js: &jetstream::Context,
    subjects: &fleet_worker::Subjects,
    store: &Store,
) -> Result<(broker::Streams, String), ServeError> {
    let replica = store.replica_id().map_err(in_store(config))?;
    let streams = broker::ensure_streams(
        js,
        subjects,
        config.pools.keys().map(String::as_str),
        broker::StreamSettings {
            intake_ack_wait: config.intake.ack_wait(),
            work_ack_wait: config.intake.work_ack_wait(),
            batch: config.intake.batch_size,
            replicas: config.nats.replicas,
            replica: &replica,
        },
    )
    .await?;
    tracing::info!(
        replica,
        prefix = subjects.prefix(),
        pools = config.pools.len(),
        "streams and consumers ready"
    );
    Ok((streams, replica))
}

/// The exporter of the commander's own spans (dispatch, classifier calls), on
/// `<prefix>.telemetry._commander.<instance>`; each batch also goes to this replica's
/// trace keeper, which keeps the spans with the traces they belong to.
fn own_spans(
    client: &async_nats::Client,
    subjects: &fleet_worker::Subjects,
    instance: &str,
    keeper: Option<crate::ingest::TraceTap>,
) -> (SpanExporter, tokio::task::JoinHandle<()>) {
    let tap = keeper.map(|k| -> fleet_worker::span::ExportTap {
        Box::new(move |body: &bytes::Bytes, spans| k.offer_commander(body.clone(), spans))
    });
    SpanExporter::start_tapped(
        client.clone(),
        subjects.telemetry("_commander", instance),
        vec![
            ("service.name".into(), AttrValue::from("fleet-commander")),
            (
                "service.instance.id".into(),
                AttrValue::from(instance.to_string()),
            ),
            (
                "service.version".into(),
                AttrValue::from(env!("CARGO_PKG_VERSION")),
            ),
        ],
        ExportConfig::default(),
        tap,
    )
}

/// Serves the API on `listen` until SIGTERM or Ctrl-C, or until `fatal` resolves.
async fn serve_api_until_signal(
    listen: std::net::SocketAddr,
    limits: crate::httpd::Limits,
    state: AppState,
    fatal: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    tracing::info!(%addr, "http api listening");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signals)?;
    let events = state.events.clone();
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
            () = fatal => {}
        }
        tracing::info!("shutting down");
        // Live streams never end by themselves: end them, or the server would wait for
        // every open dashboard before it stops.
        events.close();
    };
    let (open, refused) = state.core.metrics.http_server("api");
    let counters = crate::httpd::Counters { open, refused };
    crate::httpd::serve(listener, api::router(state), limits, counters, shutdown).await;
    Ok(())
}

/// What the long-lived tasks are started from.
struct Wiring<'a> {
    config: &'a Config,
    client: &'a async_nats::Client,
    /// The connection the server does not echo to (`broker::Connection::telemetry`).
    telemetry: &'a async_nats::Client,
    js: &'a jetstream::Context,
    subjects: &'a fleet_worker::Subjects,
    supervisor: &'a Supervisor,
    stop: &'a watch::Receiver<bool>,
    /// This commander replica's id ([`Store::replica_id`]).
    replica: &'a str,
    /// Whether other replicas run (record lookups and the OTLP relay share its looks).
    others: Arc<broker::OtherReplicas>,
    /// Whether this replica leads (`detect::lead` sets it): it notifies alerts and exports
    /// kept traces.
    leading: crate::domain::Leading,
}

/// The policy sync, and the watches of the sources checked with the policy.
struct Policies {
    sync: Arc<policy::sync::PolicySync>,
    source_watches: Vec<tokio::task::JoinHandle<()>>,
    compliance_token: Option<String>,
}

/// The registry and the rubric as configured (a configured rubric is checked against
/// the config's pools and the registry), the built-in policy checked against them, and
/// the policy engine holding the one live snapshot built from them.
fn open_engine(config: &Config, store: &Store) -> Result<Arc<policy::PolicyEngine>, ServeError> {
    if config.clock.speed != 1.0 {
        tracing::warn!(
            speed = config.clock.speed,
            origin_ms = config.clock.origin_ms,
            "COMPRESSED TIME: fleet time runs faster than the wall clock ([clock], for simulation labs only)"
        );
    }
    let registry = match config.telemetry.model_registry.as_deref() {
        Some(path) => Registry::load(path)?,
        None => Registry::builtin()?,
    };
    tracing::info!(
        source = %registry.source,
        models = registry.models().len(),
        "model registry loaded"
    );
    let rubric = match &config.classifier.rubric {
        Some(path) => Rubric::load(
            path,
            CheckAgainst {
                registry: Some(&registry),
                pools: (!config.pools.is_empty()).then_some(&config.pools),
            },
        )?,
        None => Rubric::builtin()?,
    };
    tracing::info!(
        rubric = %rubric.source,
        task_types = rubric.task_types.len(),
        classifier = config.classifier.endpoint.as_deref().unwrap_or("fallback only"),
        "routing rubric loaded"
    );
    let policy = policy::Policy::builtin(policy::CheckAgainst {
        pools: Some(&config.pools),
        registry: &registry,
        rubric: &rubric,
    })?;
    Ok(policy::PolicyEngine::open(
        store,
        policy::Start {
            routing: RoutingTable {
                pools: config.pools.clone(),
                routing: config.routing.clone(),
            },
            registry,
            registry_file: config.telemetry.model_registry.clone(),
            rubric,
            rubric_file: config.classifier.rubric.clone(),
            policy,
        },
        config.clock.build(),
        config.policy.max_deferred,
        config.policy.audit_records,
    )?)
}

/// Policies: the built-in one until the bucket or the directory says otherwise; then the
/// bucket watch, the directory watch and the push subscription (added to `tasks`), and
/// the watches of the registry and rubric files.
async fn start_policy(
    w: &Wiring<'_>,
    engine: &Arc<policy::PolicyEngine>,
    instance: &str,
    registry: &mut prometheus_client::registry::Registry,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Policies, ServeError> {
    let (config, client, js, subjects, supervisor, stop_rx) =
        (w.config, w.client, w.js, w.subjects, w.supervisor, w.stop);
    let bucket = policy::sync::open_bucket(
        js,
        &policy::sync::bucket_name(subjects.prefix()),
        config.nats.replicas,
    )
    .await?;
    let policy_sync =
        policy::sync::PolicySync::start(engine.clone(), bucket, config.policy.dir.clone()).await?;
    let rescan = Duration::from_secs(config.policy.rescan_secs);
    let source_watches =
        crate::sources::Sources::new(engine.clone(), instance).watch(rescan, supervisor);
    let live = engine.live();
    tracing::info!(
        version = %live.policy.version,
        source = live.source.as_str(),
        summary = %live.policy.summary(),
        deferred = engine.deferrals.len(),
        dir = config.policy.dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
        "policy loaded"
    );
    engine.counters.register(registry);
    let compliance_token = config.policy.compliance_token();
    {
        let (ps, stop) = (policy_sync.clone(), stop_rx.clone());
        tasks.push(supervisor.spawn("policy_watch", stop_rx.clone(), move || {
            ps.clone().watch_bucket(stop.clone())
        }));
        if config.policy.dir.is_some() {
            let (ps, stop) = (policy_sync.clone(), stop_rx.clone());
            tasks.push(supervisor.spawn("policy_dir", stop_rx.clone(), move || {
                ps.clone().watch_dir(rescan, stop.clone())
            }));
        }
        let (ps, stop, c) = (policy_sync.clone(), stop_rx.clone(), client.clone());
        let (subject, token) = (subjects.policy_push(), compliance_token.clone());
        tasks.push(supervisor.spawn("policy_push", stop_rx.clone(), move || {
            ps.clone()
                .serve_push(c.clone(), subject.clone(), token.clone(), stop.clone())
        }));
    }
    Ok(Policies {
        sync: policy_sync,
        source_watches,
        compliance_token,
    })
}

/// The telemetry receivers (OTLP gRPC and HTTP, NATS) behind one ingestor (handing trace
/// exports to the keeper through `traces`, and OTLP exports on to the other replicas), the
/// NATS connection watch and the queue-depth poll.
async fn start_telemetry(
    w: &Wiring<'_>,
    traces: Option<crate::ingest::TraceTap>,
    metrics: &Arc<Metrics>,
    fleet: &fleet::FleetHandle,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ServeError> {
    let (config, client, js, subjects, supervisor, stop_rx) =
        (w.config, w.client, w.js, w.subjects, w.supervisor, w.stop);
    let (relay, mut telemetry_tasks) = ingest::relay::Relay::start(
        w.telemetry.clone(),
        w.others.clone(),
        subjects,
        w.replica,
        stop_rx.clone(),
    );
    registry.register(
        "telemetry_relayed",
        "OTLP exports passed on to the other replicas over NATS, by signal and outcome",
        relay.counts.clone(),
    );
    let ingestor = &Ingestor {
        fleet: fleet.clone(),
        metrics: metrics.clone(),
        limits: config.telemetry.decode_limits(),
        supervisor: supervisor.clone(),
        traces,
        relay: Some(relay),
    };
    let t = &config.telemetry;
    if t.grpc {
        let l = otlp::bind(t.grpc_listen, "otlp grpc")
            .await
            .map_err(|source| ServeError::Listen {
                addr: t.grpc_listen.to_string(),
                source,
            })?;
        let stop = stopped(stop_rx.clone());
        let ing = ingestor.clone();
        let limits = config.http.connection_limits();
        telemetry_tasks.push(tokio::spawn(async move {
            if let Err(e) = otlp::serve_grpc(ing, l, limits, stop).await {
                tracing::error!(error = %e, "otlp grpc server failed");
            }
        }));
    }
    if t.http {
        let l = otlp::bind(t.http_listen, "otlp http")
            .await
            .map_err(|source| ServeError::Listen {
                addr: t.http_listen.to_string(),
                source,
            })?;
        let app = otlp::http_router(ingestor.clone());
        let stop = stopped(stop_rx.clone());
        let (open, refused) = metrics.http_server("otlp_http");
        let counters = crate::httpd::Counters { open, refused };
        let limits = config.http.connection_limits();
        telemetry_tasks.push(tokio::spawn(crate::httpd::serve(
            l, app, limits, counters, stop,
        )));
    }
    if t.nats {
        let (c, sub, ing, stop) = (
            w.telemetry.clone(),
            subjects.clone(),
            ingestor.clone(),
            stop_rx.clone(),
        );
        telemetry_tasks.push(
            supervisor.spawn("telemetry_nats", stop_rx.clone(), move || {
                ingest::nats::run(c.clone(), sub.clone(), ing.clone(), stop.clone())
            }),
        );
    }
    {
        let (c, health, m, stop) = (
            client.clone(),
            supervisor.health.clone(),
            metrics.clone(),
            stop_rx.clone(),
        );
        telemetry_tasks.push(supervisor.spawn("nats_watch", stop_rx.clone(), move || {
            watch_nats(c.clone(), health.clone(), m.clone(), stop.clone())
        }));
    }
    {
        let (js, sub, fl, stop) = (js.clone(), subjects.clone(), fleet.clone(), stop_rx.clone());
        let every = Duration::from_millis(t.queue_poll_ms);
        telemetry_tasks.push(supervisor.spawn("queue_poll", stop_rx.clone(), move || {
            poll_queues(js.clone(), sub.clone(), fl.clone(), every, stop.clone())
        }));
    }
    Ok(telemetry_tasks)
}

/// The task path's loops, each restarted after a panic: what a dead loop had in hand was
/// not acked, so JetStream hands it out again. In the order they stop: intake and results
/// first, then what follows from them.
fn start_task_path(
    w: &Wiring<'_>,
    ctx: &Arc<Ctx>,
    streams: broker::Streams,
    engine: &Arc<policy::PolicyEngine>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (config, supervisor, stop_rx) = (w.config, w.supervisor, w.stop);
    let release = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        let every = Duration::from_millis(config.policy.release_interval_ms);
        let batch = config.policy.release_batch;
        supervisor.spawn("release", stop_rx.clone(), move || {
            pipeline::release::run(ctx.clone(), every, batch, stop.clone())
        })
    };
    let retarget = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        let timeout = Duration::from_millis(config.routing.target_bind_timeout_ms);
        supervisor.spawn("retarget", stop_rx.clone(), move || {
            pipeline::retarget::run(ctx.clone(), timeout, stop.clone())
        })
    };
    let stubs = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        supervisor.spawn("stubs", stop_rx.clone(), move || {
            pipeline::stubs::run(ctx.clone(), stop.clone())
        })
    };
    let batch = config.intake.batch_size;
    let deadletter = {
        let (ctx, stop, consumer) = (ctx.clone(), stop_rx.clone(), streams.dead_letters);
        supervisor.spawn("deadletter", stop_rx.clone(), move || {
            let ctx = ctx.clone();
            pipeline::consume_batches("deadletter", consumer.clone(), 16, stop.clone(), move |b| {
                let ctx = ctx.clone();
                async move { pipeline::deadletter::handle_batch(&ctx, b).await }
            })
        })
    };
    let intake = {
        let (ctx, stop, consumer) = (ctx.clone(), stop_rx.clone(), streams.intake);
        supervisor.spawn("intake", stop_rx.clone(), move || {
            let ctx = ctx.clone();
            pipeline::consume_batches("intake", consumer.clone(), batch, stop.clone(), move |b| {
                let ctx = ctx.clone();
                async move { pipeline::intake::handle_batch(&ctx, b).await }
            })
        })
    };
    let results = {
        let (ctx, stop, consumer) = (ctx.clone(), stop_rx.clone(), streams.results);
        supervisor.spawn("results", stop_rx.clone(), move || {
            let ctx = ctx.clone();
            pipeline::consume_batches("results", consumer.clone(), batch, stop.clone(), move |b| {
                let ctx = ctx.clone();
                async move { pipeline::results::handle_batch(&ctx, b).await }
            })
        })
    };

    let sweeper = {
        let retention = (
            Duration::from_secs(config.store.retention_hours * 3600),
            config.store.max_records,
        );
        let (store, decisions, log_cfg) = (
            ctx.core.store.clone(),
            ctx.core.decisions.clone(),
            config.decisions.clone(),
        );
        let (engine, stop, metrics) = (engine.clone(), stop_rx.clone(), ctx.core.metrics.clone());
        supervisor.spawn("sweeper", stop_rx.clone(), move || {
            sweep_store(
                (store.clone(), metrics.clone()),
                retention,
                decisions.clone(),
                log_cfg.clone(),
                engine.clone(),
                stop.clone(),
            )
        })
    };
    vec![
        intake, results, release, deadletter, retarget, stubs, sweeper,
    ]
}

/// What runs until shutdown.
struct Running {
    task_path: Vec<tokio::task::JoinHandle<()>>,
    telemetry: Vec<tokio::task::JoinHandle<()>>,
    source_watches: Vec<tokio::task::JoinHandle<()>>,
    store: Store,
    spans: SpanExporter,
    spans_task: tokio::task::JoinHandle<()>,
    /// Told last that this replica stopped, once the task path settled what it will.
    ledger: Arc<policy::ledger_share::LedgerShare>,
    /// The task path's context, to hand the waiting tasks to the other replicas.
    ctx: Arc<Ctx>,
}

/// Waits up to `intake.shutdown_grace_secs` for the loops to finish what they hold and the
/// store to flush; past it, says what was left (nothing acked is lost: JetStream redelivers
/// the rest).
async fn shut_down(config: &Config, r: Running, client: &async_nats::Client) {
    let grace = Duration::from_secs(config.intake.shutdown_grace_secs);
    let batch = config.policy.release_batch;
    let c = client.clone();
    let drained = tokio::time::timeout(grace, async move {
        for t in r.task_path.into_iter().chain(r.telemetry) {
            let _ = t.await;
        }
        for w in r.source_watches {
            w.abort();
        }
        hand_over_waiting(&r.ctx, &r.ledger, batch, grace / 2).await;
        if let Err(e) = r.store.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        r.ledger.write_stopped(Duration::from_secs(2)).await;
        // Handles to the exporter outlive this (the classifier's hook, the API's state):
        // tell it to publish what is queued and stop instead of waiting for the last drop.
        r.spans.shutdown();
        let _ = r.spans_task.await;
        let _ = c.flush().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            nats_connected = client.connection_state() == async_nats::connection::State::Connected,
            "shutdown grace passed with work unfinished; exiting: what was not acked stays in JetStream and is delivered again, spans not yet exported are dropped"
        );
    }
}

/// While other replicas run, the tasks waiting here (deferred, parked) go to them through
/// the intake stream, now that this replica's intake no longer takes any
/// ([`pipeline::release::hand_over`]); a lone commander keeps them for its restart.
async fn hand_over_waiting(
    ctx: &Ctx,
    ledger: &policy::ledger_share::LedgerShare,
    batch: usize,
    within: Duration,
) {
    let deferrals = &ctx.core.policy.deferrals;
    let waiting = deferrals.len() + deferrals.parked_len();
    // A store that can write nothing more could not take a handed task out of its queue:
    // it would be released again at the restart, a copy of one another replica holds.
    if waiting == 0 || ledger.replicas.get() < 2 || ctx.core.store.failure().is_some() {
        return;
    }
    let done = pipeline::release::hand_over(ctx, batch, within).await;
    tracing::info!(
        handed = done.handed,
        left = done.left,
        "handed the tasks waiting here to the other replicas"
    );
}

/// The classifier's calls become the commander's own GenAI spans (exported like every
/// other commander span) and a line in the fleet's cost ledger: a span-only "worker"
/// `<instance>/classifier` in pool `_commander`, team `fleet-commander`, feature
/// `classification`. The meta-agent pays for its thinking where everyone can see it.
fn classifier_hook(spans: SpanExporter, fleet: FleetHandle, instance: &str) -> CallHook {
    use crate::ingest::normalise::{Dims, Identity, Operation, SpanEvent};
    use fleet_worker::span::{SpanKind, SpanRecord};
    use fleet_worker::trace::{SpanId, TraceId};
    let identity = Arc::new(Identity {
        worker_id: format!("{instance}/classifier"),
        pool: Some(crate::ingest::nats::COMMANDER_TOKEN.to_string()),
        agent_name: Some("classifier".into()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        service: Some("fleet-commander".into()),
    });
    Arc::new(move |c: CallRecord| {
        let (trace_id, parent) = match c.trace {
            Some((t, p)) => (TraceId(t), p.map(SpanId)),
            None => (TraceId::random(), None),
        };
        let span_id = SpanId::random();
        let mut span = SpanRecord::new(
            format!("chat {}", c.request_model),
            SpanKind::Client,
            trace_id,
            span_id,
        );
        span.parent_span_id = parent;
        span.start = c.start;
        span.end = c.end;
        span.attr("gen_ai.operation.name", "chat")
            .attr("gen_ai.provider.name", c.provider)
            .attr("gen_ai.request.model", c.request_model.clone())
            .attr("server.address", c.server.clone())
            .attr("fleet.classifier.attempt", i64::from(c.attempt));
        if let Some(m) = &c.response_model {
            span.attr("gen_ai.response.model", m.clone());
        }
        if let Some(u) = &c.usage {
            span.attr("gen_ai.usage.input_tokens", u.input as i64)
                .attr("gen_ai.usage.output_tokens", u.output as i64);
        }
        if let Some(t) = &c.task_id {
            span.attr("fleet.task.id", t.clone());
        }
        if let Some(e) = c.error {
            span.attr("error.type", e);
            span.error = Some(e.to_string());
        }
        spans.record(span);
        let ns = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        };
        let event = SpanEvent {
            identity: identity.clone(),
            agent_name: Some("classifier".into()),
            trace_id: trace_id.0,
            span_id: span_id.0,
            parent_span_id: parent.map(|p| p.0),
            start_ns: ns(c.start),
            end_ns: ns(c.end),
            error: c.error.is_some(),
            error_type: c.error.map(str::to_string),
            operation: Operation::Inference,
            provider: Some(c.provider.to_string()),
            model: Some(c.response_model.unwrap_or(c.request_model)),
            usage: c.usage,
            tool: None,
            tool_args_hash: None,
            task_id: None,
            expected_duration_s: None,
            task_root: false,
            dims: Dims {
                team: Some("fleet-commander".into()),
                feature: Some("classification".into()),
                ..Default::default()
            },
            names_agent: false,
            resource: identity.clone(),
            resource_names_worker: true,
        };
        // Telemetry is shed first under load; the counter on /metrics says so.
        let _ = fleet.offer(crate::fleet::Ingest::Spans(vec![event]));
    })
}

/// Deletes finished task records and old decisions past their retention periods (and
/// the oldest finished records beyond `store.max_records`), a bounded number at a time.
async fn sweep_store(
    (store, metrics): (Store, Arc<Metrics>),
    (retention, max_records): (Duration, usize),
    decisions: DecisionLog,
    log_cfg: crate::config::DecisionLogConfig,
    policy: Arc<policy::PolicyEngine>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let cutoff = std::time::SystemTime::now() - retention;
        let (sweeping, swept) = (store.clone(), metrics.task_records_swept.clone());
        drain_off_workers(
            move || {
                let n = sweeping.sweep(cutoff, max_records, 10_000)?;
                swept.inc_by(n as u64);
                Ok::<_, crate::store::StoreError>(n)
            },
            "swept finished tasks past retention or store.max_records",
            "store sweep",
        )
        .await;
        metrics
            .task_records
            .set(i64::try_from(store.task_count()).unwrap_or(i64::MAX));
        match policy.prune_ledger() {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired budget ledger cells dropped"),
            Err(e) => tracing::error!(error = %e, "budget ledger prune failed"),
        }
        let keys = policy.live().throttles.retain_recent(policy.now_ms());
        tracing::debug!(keys, "throttle keys kept");
        let cutoff =
            std::time::SystemTime::now() - Duration::from_secs(log_cfg.retention_hours * 3600);
        let (pruning, max) = (decisions.clone(), log_cfg.max_records);
        drain_off_workers(
            move || pruning.prune(cutoff, max, 10_000),
            "pruned decisions past retention",
            "decision log prune",
        )
        .await;
    }
}

/// Runs a retention step on tokio's blocking pool until it removes nothing or fails: a
/// step that empties the task log's oldest segment (a task sweep, dropped decision pages)
/// may read it whole and sync the log.
async fn drain_off_workers<E: std::fmt::Display + Send + 'static>(
    step: impl Fn() -> Result<usize, E> + Clone + Send + 'static,
    removed: &str,
    what: &str,
) {
    loop {
        match tokio::task::spawn_blocking(step.clone()).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => tracing::info!(removed = n, "{removed}"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "{what} failed");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} did not run");
                break;
            }
        }
    }
}

/// Follows the NATS connection: while it is down, `/readyz` names `nats` and answers 503,
/// `fleet_nats_connected` is 0, and each change is logged once. (The client reconnects by
/// itself; nothing here touches the connection.)
async fn watch_nats(
    client: async_nats::Client,
    health: Arc<crate::supervise::Health>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut was_up: Option<bool> = None;
    let mut down_since = std::time::Instant::now();
    loop {
        let up = client.connection_state() == async_nats::connection::State::Connected;
        if was_up != Some(up) {
            metrics.nats_connected.set(i64::from(up));
            if up {
                health.set_up("nats");
                if was_up.is_some() {
                    tracing::info!(
                        down_ms = down_since.elapsed().as_millis() as u64,
                        "NATS connection back; taking work again"
                    );
                }
            } else {
                down_since = std::time::Instant::now();
                health.set_down("nats", "NATS is unreachable; reconnecting".into());
                tracing::warn!("lost the NATS connection; not ready until it is back");
            }
            was_up = Some(up);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Reads each pool's queue depth (pending + ack-pending on its JetStream consumer) for the
/// live state. Pools are the ones the fleet state knows (configured or seen), and, looked
/// for every [`OTHER_QUEUES_EVERY`] polls, any other pool whose queue holds tasks: a pool
/// taken out of the config (or never in it) keeps its consumer and what waits there, and
/// the operator must see it (`GET /v1/pools`, the `queue_unserved` alert) to serve or
/// purge it.
async fn poll_queues(
    js: jetstream::Context,
    subjects: fleet_worker::protocol::Subjects,
    fleet: FleetHandle,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Ok(stream) = js.get_stream(subjects.work_stream()).await else {
            continue;
        };
        let pools: Vec<String> = fleet
            .snapshot()
            .pools
            .iter()
            .map(|p| p.name.clone())
            .collect();
        for pool in &pools {
            let name = fleet_worker::protocol::pool_consumer_name(pool);
            match stream.consumer_info(&name).await {
                Ok(info) => fleet.task_event(TaskEvent::Queue {
                    pool: pool.clone(),
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                }),
                Err(e) => tracing::debug!(pool, error = %e, "queue depth not read"),
            }
        }
        polls += 1;
        if polls % OTHER_QUEUES_EVERY != 1 {
            continue;
        }
        // The live state takes each in, and says so (`FleetState::take_in_pool`).
        for (pool, pending, ack_pending) in other_queues(&stream, &pools).await {
            fleet.task_event(TaskEvent::Queue {
                pool,
                pending,
                ack_pending,
            });
        }
    }
}

/// Polls between two looks for the queues of pools the fleet state does not know (about
/// 30 s at the default `telemetry.queue_poll_ms`): a look lists every consumer of the work
/// stream, targeted ones included.
const OTHER_QUEUES_EVERY: u64 = 15;

/// The pools, other than `known`, whose queue in the work stream holds tasks: (pool,
/// pending, ack-pending), from the pools' consumers (`pool-<pool>`).
async fn other_queues(
    stream: &jetstream::stream::Stream,
    known: &[String],
) -> Vec<(String, u64, u64)> {
    use futures::StreamExt;
    let prefix = fleet_worker::protocol::pool_consumer_name("");
    let mut found = Vec::new();
    let mut consumers = stream.consumers();
    while let Some(info) = consumers.next().await {
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "the work stream's consumers were not listed");
                break;
            }
        };
        let Some(pool) = info.name.strip_prefix(&prefix) else {
            continue;
        };
        let waiting = info.num_pending + info.num_ack_pending as u64;
        if waiting > 0
            && fleet_worker::protocol::is_subject_token(pool)
            && !known.iter().any(|k| k == pool)
        {
            found.push((
                pool.to_string(),
                info.num_pending,
                info.num_ack_pending as u64,
            ));
        }
    }
    found
}
