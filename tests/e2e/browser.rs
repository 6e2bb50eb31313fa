//! The dashboard in a real headless Chromium (Debian `chromium` and `chromium-driver`),
//! driven over WebDriver against the real binary, real SDK workers and a simulated
//! agent's heartbeats. Screenshots of each page land in `target/browser-artifacts/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::common::{Stack, TWO_POOLS, WAIT, eventually, free_port, heartbeats};
use crate::operator::{ENV, TOKENS, slow_worker, submit};

/// chromedriver on a port of its own, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn driver() -> Driver {
    let bin = std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "chromedriver".into());
    let port = free_port();
    let child = Command::new(&bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin} (Debian package chromium-driver): {e}"));
    let url = format!("http://127.0.0.1:{port}");
    let d = Driver { child, url };
    eventually("chromedriver listens", WAIT, async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    d
}

async fn browser(d: &Driver) -> Client {
    let mut opts = json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-dev-shm-usage", "--window-size=1400,1000"]});
    let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if std::path::Path::new(&chromium).exists() {
        opts["binary"] = json!(chromium);
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), opts);
    ClientBuilder::native()
        .capabilities(caps)
        .connect(&d.url)
        .await
        .expect("a Chromium session")
}

fn artifacts() -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(artifacts().join(format!("{name}.png")), png).unwrap();
}

/// No uncaught error, rejected promise or console.error on the page so far.
async fn no_console_errors(c: &Client, page: &str) {
    let errors = c
        .execute(
            "return window.__fleetErrors || ['the app did not start']",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(errors, json!([]), "console errors on {page}");
}

/// What `act` makes of the first element matching `css`, once there is one. The live
/// pages re-render as the stream speaks (the Policy page on `policy` events, its waiting
/// list every 5 s), so an element found may be replaced before `act` reaches it (a stale
/// reference): then it is looked up again.
async fn on_element<T>(
    c: &Client,
    css: &str,
    act: impl AsyncFn(fantoccini::elements::Element) -> Result<T, fantoccini::error::CmdError>,
) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let found = c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        match act(found).await {
            Ok(t) => return t,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{css}: {e}"),
        }
    }
}

/// The text of the first element matching `css`.
async fn text(c: &Client, css: &str) -> String {
    on_element(c, css, async |e| e.text().await).await
}

/// Clicks the first element matching `css`.
async fn click(c: &Client, css: &str) {
    on_element(c, css, async |e| e.click().await).await
}

/// Clicks pause on worker a1's page (the control socket carries it) and waits until the
/// ack says done and the worker reports paused.
async fn pause_a1_from_its_page(c: &Client, base: &str, stack: &Stack) {
    c.goto(&format!("{base}/#/worker/a1")).await.unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#pause"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the ack says done", WAIT, async || {
        text(c, "#ack").await.starts_with("done")
    })
    .await;
    eventually("the worker reports paused", WAIT, async || {
        stack.get_json("/v1/workers/a1").await["paused"] == true
    })
    .await;
}

/// The pools page: each pool with its workers, and the pool commands. Block, reroute
/// and weight `beta`, and restore it; then purge its queue, where a task waits for a
/// worker (beta has none): a second click purges, and the task ends cancelled without
/// running.
async fn operate_beta_from_the_pools_page(c: &Client, base: &str, stack: &Stack) {
    c.goto(&format!("{base}/#/pools")).await.unwrap();
    eventually("both pools are listed", WAIT, async || {
        let rows = text(c, "#pools tbody").await;
        rows.contains("alpha") && rows.contains("beta")
    })
    .await;
    c.execute(
        "document.querySelector('#pf select[name=pool]').value = 'beta';",
        vec![],
    )
    .await
    .unwrap();
    click(c, "#pf button[data-c=block]").await;
    eventually("beta is blocked", WAIT, async || {
        let blocks = stack.get_json("/v1/control/state").await["blocks"].clone();
        blocks[0]["value"] == "beta" && blocks[0]["scope"] == "pool"
    })
    .await;
    // Rerouted to alpha and weighted too: the row shows all three.
    c.execute(
        "document.querySelector('#pf select[name=to]').value = 'alpha'; document.querySelector('#pf input[name=weight]').value = '2.5';",
        vec![],
    )
    .await
    .unwrap();
    click(c, "#pf button[data-c=reroute]").await;
    eventually("the reroute is in force", WAIT, async || {
        stack.get_json("/v1/control/state").await["reroutes"]
            == json!([{"from": "beta", "to": "alpha"}])
    })
    .await;
    click(c, "#pf button[data-c=weight]").await;
    eventually("the row says so", WAIT, async || {
        let row = text(c, "#pools tr[data-pool=beta]").await;
        row.contains("blocked") && row.contains("rerouted to alpha") && row.contains("weight 2.5")
    })
    .await;
    shot(c, "pools").await;
    click(c, "#pf button[data-c=restore]").await;
    eventually("beta is restored", WAIT, async || {
        let st = stack.get_json("/v1/control/state").await;
        st["blocks"] == json!([])
            && st["reroutes"] == json!([])
            && st["weights"] == json!([])
            && text(c, "#pools tr[data-pool=beta]").await.ends_with('—')
    })
    .await;
    // The cap set above would defer it: lifted first.
    let lift = reqwest::Client::new()
        .post(stack.http("/v1/control"))
        .bearer_auth("ops-token")
        .json(&json!({"command": "lift_cost_cap"}))
        .send()
        .await
        .unwrap();
    assert_eq!(lift.status().as_u16(), 200);
    submit(&stack.client, "queued-beta", "beta").await;
    eventually("the task waits in beta's queue", WAIT, async || {
        stack.get_json("/v1/tasks/queued-beta").await["state"] == "dispatched"
    })
    .await;
    click(c, "#pf button[data-c=purge]").await;
    let armed = text(c, "#pf button[data-c=purge]").await;
    assert!(armed.contains("click again"), "{armed}");
    assert_eq!(
        stack.get_json("/v1/tasks/queued-beta").await["state"],
        "dispatched",
        "one click purges nothing"
    );
    click(c, "#pf button[data-c=purge]").await;
    eventually("the purge is acknowledged", WAIT, async || {
        text(c, "#pool-out")
            .await
            .starts_with("cancelled 1 queued task(s) of beta")
    })
    .await;
    let rec = stack.get_json("/v1/tasks/queued-beta").await;
    assert_eq!(rec["outcome"]["status"], "cancelled", "{rec}");
    no_console_errors(c, "pools").await;
}

/// The whole operator path in a browser: sign in, the overview shows what the API says,
/// an alert reaches the strip within 2 s, a pause clicked on an agent reaches the worker
/// and the audit, a decision shows every candidate, and a viewer sees no controls (the
/// API refuses them too). No page logs an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_an_operator_acts_from_it() {
    // Every trace kept, so the first task's is there to draw.
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("keep.policy.toml"),
        "[sampling]\nhealthy_rate = 1.0\n",
    )
    .unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[detect]\ninterval_ms = 200\n[policy]\ndir = {:?}\n{TOKENS}",
        policies.path()
    );
    let stack = Stack::start_with_env(&toml, ENV)
        .await
        .with_token("ops-token");
    let (worker, started) =
        slow_worker(&stack.client, "alpha", "a1", Duration::from_millis(20)).await;
    submit(&stack.client, "before-1", "alpha").await;
    eventually("a first task completes", WAIT, async || {
        stack.get_json("/v1/tasks/before-1").await["state"] == "completed"
    })
    .await;
    eventually("the snapshot has the worker", WAIT, async || {
        stack.get_json("/v1/workers").await["total"] == 1
    })
    .await;

    let d = driver().await;
    let c = browser(&d).await;
    let base = stack.commander.http().to_string();

    // Sign in: the shell asks for a token.
    c.goto(&format!("{base}/")).await.unwrap();
    let input = c
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#login-token"))
        .await
        .unwrap();
    shot(&c, "sign-in").await;
    input.send_keys("ops-token").await.unwrap();
    c.find(Locator::Css("#login-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("signed in as the operator", WAIT, async || {
        text(&c, "#who").await == "ops · operator"
    })
    .await;

    // The overview shows the numbers the API reports.
    eventually("the overview matches the API", WAIT, async || {
        let fleet = stack.get_json("/v1/fleet").await;
        let shown: Vec<u64> = {
            let mut v = Vec::new();
            for s in ["ACTIVE", "IDLE", "WAITING", "STUCK", "ERROR", "LOST"] {
                let t = text(&c, &format!("#states [data-state={s}] b")).await;
                v.push(t.parse().unwrap());
            }
            v
        };
        let api_states: Vec<u64> = ["ACTIVE", "IDLE", "WAITING", "STUCK", "ERROR"]
            .iter()
            .map(|s| fleet["states"][s].as_u64().unwrap_or(0))
            .chain([fleet["lost"].as_u64().unwrap()])
            .collect();
        shown == api_states
    })
    .await;
    let pools = stack.get_json("/v1/pools").await["pools"]
        .as_array()
        .unwrap()
        .len();
    let gauges = c
        .find_all(Locator::Css("#queues [data-pool]"))
        .await
        .unwrap();
    assert_eq!(gauges.len(), pools);
    no_console_errors(&c, "overview").await;

    // An alert reaches the strip within 2 s of firing.
    // A simulated agent whose context is 97 % full: `context_critical` fires.
    let agent = heartbeats(stack.client.clone(), "ctx-1", "beta", 124_000);
    let mut alert_id = String::new();
    eventually("context_critical fires", WAIT, async || {
        let open = stack
            .get_json("/v1/alerts?state=firing&rule=context_critical")
            .await;
        match open["alerts"].as_array().and_then(|a| a.first()) {
            Some(a) => {
                alert_id = a["id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    })
    .await;
    let fired = Instant::now();
    c.wait()
        .at_most(Duration::from_secs(2))
        .for_element(Locator::Css(&format!("#strip [data-alert=\"{alert_id}\"]")))
        .await
        .unwrap_or_else(|e| panic!("the alert was not in the strip within 2 s: {e}"));
    eprintln!(
        "alert in the strip {:?} after the API said firing",
        fired.elapsed()
    );
    // Every alert in the strip shows its state unless it fires: the strip also holds
    // pending and resolved ones, which read like live ones without it.
    for item in c
        .find_all(Locator::Css("#strip [data-alert]"))
        .await
        .unwrap()
    {
        let state = item.attr("data-state").await.unwrap().unwrap_or_default();
        let text = item.text().await.unwrap();
        let id = item.attr("data-alert").await.unwrap().unwrap_or_default();
        if id == alert_id {
            assert_eq!(state, "firing", "{text}");
        }
        assert_eq!(
            state != "firing",
            text.contains(&state),
            "a {state} alert in the strip: {text}"
        );
    }
    shot(&c, "overview").await;
    no_console_errors(&c, "overview with an alert").await;

    // A pause clicked in the drill-down reaches the worker: it stops pulling.
    pause_a1_from_its_page(&c, &base, &stack).await;
    shot(&c, "agent").await;
    no_console_errors(&c, "agent").await;
    submit(&stack.client, "while-paused", "alpha").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        started.lock().unwrap().as_slice(),
        ["before-1"],
        "a paused worker pulls nothing"
    );
    c.goto(&format!("{base}/#/audit")).await.unwrap();
    let audit = text(&c, "#audit tbody").await;
    assert!(audit.contains("pause a1"), "{audit}");
    assert!(audit.contains("ops"), "{audit}");
    shot(&c, "audit").await;
    no_console_errors(&c, "audit").await;

    // A decision's candidates render, every one of them.
    let decision = stack.get_json("/v1/decisions/before-1").await;
    let want = decision["candidates"].as_array().unwrap().len();
    assert!(want > 0, "{decision}");
    c.goto(&format!("{base}/#/decision/before-1"))
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#candidates tr.candidate"))
        .await
        .unwrap();
    let rows = c
        .find_all(Locator::Css("#candidates tr.candidate"))
        .await
        .unwrap();
    assert_eq!(rows.len(), want);
    shot(&c, "decision").await;
    no_console_errors(&c, "decision").await;

    // The task box opens a task's page: where it went, its history, and its result as
    // its worker published it.
    let find = c.find(Locator::Css("#find-id")).await.unwrap();
    find.send_keys(&format!(
        "before-1{}",
        char::from(fantoccini::key::Key::Enter)
    ))
    .await
    .unwrap();
    // `text` waits for the output, which is drawn with the rest of the page.
    let output = text(&c, "#task-output").await;
    assert!(output.contains("\"done\": \"before-1\""), "{output}");
    assert_eq!(text(&c, "#task-state").await, "completed");
    let result = text(&c, "#task-result").await;
    assert!(result.contains("ok") && result.contains("a1"), "{result}");
    let history = text(&c, "#task-history").await;
    assert!(
        history.contains("dispatched") && history.contains("completed"),
        "{history}"
    );
    assert!(
        c.find(Locator::Css("#task-cancel")).await.is_err(),
        "a finished task has no Cancel"
    );
    shot(&c, "task").await;
    no_console_errors(&c, "task").await;

    // The other pages render without errors.
    for (page, css) in [
        ("workers", "#t tbody tr"),
        ("decisions", "#rows tr"),
        ("traces", "#rows tr"),
        ("costs", "#rows tr"),
        ("alerts", "#open tr"),
        ("policy", "h1"),
    ] {
        c.goto(&format!("{base}/#/{page}")).await.unwrap();
        c.wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        shot(&c, page).await;
        no_console_errors(&c, page).await;
    }
    // The first task's kept trace: the commander's dispatch span, the run under it.
    let mut kept = serde_json::Value::Null;
    eventually("the first task's trace is kept", WAIT, async || {
        kept = stack.get_json("/v1/tasks/before-1").await["kept_trace"].clone();
        !kept.is_null()
    })
    .await;
    {
        let id = kept["trace_id"].as_str().unwrap();
        let t = stack.get_json(&format!("/v1/traces/{id}")).await;
        assert_eq!(t["span_tree"][0]["name"], "send fleet.work.alpha", "{t}");
        c.goto(&format!("{base}/#/trace/{id}")).await.unwrap();
        c.wait()
            .at_most(WAIT)
            .for_element(Locator::Css(".wf .row"))
            .await
            .unwrap();
        // Every bar inside the lane: the scale is the spans' extent, which the commander's
        // dispatch span (before the run) makes longer than the run's duration.
        let ends = c
            .execute(
                "return [...document.querySelectorAll('.wf .span')].map(e => parseFloat(e.style.left) + parseFloat(e.style.width));",
                vec![],
            )
            .await
            .unwrap();
        let ends: Vec<f64> = serde_json::from_value(ends).unwrap();
        assert!(!ends.is_empty());
        assert!(
            ends.iter().all(|e| *e <= 100.01),
            "bars past the lane: {ends:?} in {t}"
        );
        shot(&c, "trace").await;
        no_console_errors(&c, "trace").await;
    }

    // A task the emergency cost cap deferred is listed on the policy page, and an
    // operator cancels it there: its producer gets `cancelled`, and it never runs.
    let cap = reqwest::Client::new()
        .post(stack.http("/v1/control"))
        .bearer_auth("ops-token")
        .json(&json!({"command": "cost_cap", "usd": 0.000001, "window": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(cap.status().as_u16(), 200);
    submit(&stack.client, "capped-1", "alpha").await;
    eventually("the cap defers the task", WAIT, async || {
        stack.get_json("/v1/tasks/capped-1").await["state"] == "deferred"
    })
    .await;
    // Away and back: the policy page is drawn anew, with the cap.
    c.goto(&format!("{base}/#/audit")).await.unwrap();
    c.goto(&format!("{base}/#/policy")).await.unwrap();
    let cancel = "#waiting tr[data-task=\"capped-1\"] button[data-cancel]";
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(cancel))
        .await
        .unwrap();
    let row = text(&c, "#waiting tr[data-task=\"capped-1\"]").await;
    assert!(row.contains("operator_cost_cap"), "{row}");
    // A cap under a hundredth of a cent is shown as set, not as $0.0000.
    let cap = text(&c, "#cap").await;
    assert!(cap.starts_with("$0.000001 per 1h"), "{cap}");
    shot(&c, "policy-waiting").await;
    click(&c, cancel).await;
    eventually("the task is cancelled", WAIT, async || {
        let rec = stack.get_json("/v1/tasks/capped-1").await;
        rec["state"] == "failed" && rec["outcome"]["status"] == "cancelled"
    })
    .await;
    eventually("the row is gone", WAIT, async || {
        c.find(Locator::Css("#waiting tr[data-task=\"capped-1\"]"))
            .await
            .is_err()
    })
    .await;
    no_console_errors(&c, "policy with a waiting task").await;
    assert!(!started.lock().unwrap().iter().any(|t| t == "capped-1"));
    // Its page says so: the commander's own result, with the operator's reason.
    c.goto(&format!("{base}/#/task/capped-1")).await.unwrap();
    eventually("the task page shows the cancel", WAIT, async || {
        text(&c, "#task-result")
            .await
            .contains("cancelled by ops: cancelled from the dashboard")
    })
    .await;
    no_console_errors(&c, "a cancelled task").await;
    // The finished tasks, newest first: the cancel among them, found by its status.
    c.goto(&format!("{base}/#/tasks")).await.unwrap();
    eventually("the finished tasks list both", WAIT, async || {
        let rows = text(&c, "#rows").await;
        rows.contains("capped-1") && rows.contains("before-1")
    })
    .await;
    c.execute(
        "document.querySelector('#f select[name=status]').value = 'cancelled'; document.querySelector('#f button[type=submit]').click();",
        vec![],
    )
    .await
    .unwrap();
    eventually("only the cancelled task is left", WAIT, async || {
        let rows = text(&c, "#rows").await;
        rows.contains("capped-1") && !rows.contains("before-1")
    })
    .await;
    click(&c, "#rows tr[data-task=\"capped-1\"]").await;
    eventually("a row opens its task page", WAIT, async || {
        c.current_url()
            .await
            .is_ok_and(|u| u.fragment() == Some("/task/capped-1"))
    })
    .await;
    no_console_errors(&c, "the finished tasks").await;

    // The pools page and its commands.
    operate_beta_from_the_pools_page(&c, &base, &stack).await;

    // A viewer sees no control buttons, and the API answers 403 to its commands.
    c.execute(
        "sessionStorage.setItem('fleet.token', 'view-token'); location.hash = '#/worker/a1'; location.reload();",
        vec![],
    )
    .await
    .unwrap();
    eventually("signed in as the viewer", WAIT, async || {
        text(&c, "#who").await == "watcher · viewer"
    })
    .await;
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#state"))
        .await
        .unwrap();
    let controls = c
        .find(Locator::Css("[data-role-needs=operator]"))
        .await
        .unwrap();
    assert!(
        !controls.is_displayed().await.unwrap(),
        "a viewer sees no controls"
    );
    shot(&c, "agent-as-viewer").await;
    no_console_errors(&c, "agent as viewer").await;
    let r = reqwest::Client::new()
        .post(stack.http("/v1/control"))
        .bearer_auth("view-token")
        .json(&json!({"command": "resume", "worker": "a1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    c.close().await.unwrap();
    agent.abort();
    worker.shutdown().await;
}

/// Behind a reverse proxy that serves it under a prefix (an ingress at `/fleet/`), the
/// dashboard loads its files, calls the API, follows the live stream and sends a command
/// over the control socket, all under the prefix. The proxy answers 404 to anything
/// outside it, as a shared host would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_under_a_path_prefix_behind_a_proxy() {
    let toml = format!("{TWO_POOLS}\n{TOKENS}");
    let stack = Stack::start_with_env(&toml, ENV)
        .await
        .with_token("ops-token");
    let (worker, _started) =
        slow_worker(&stack.client, "alpha", "a1", Duration::from_millis(20)).await;
    eventually("the snapshot has the worker", WAIT, async || {
        stack.get_json("/v1/workers").await["total"] == 1
    })
    .await;
    let upstream: std::net::SocketAddr = stack
        .commander
        .http()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let base = prefix_proxy(upstream).await;

    let d = driver().await;
    let c = browser(&d).await;
    c.goto(&format!("{base}/")).await.unwrap();
    c.execute(
        "sessionStorage.setItem('fleet.token', 'ops-token'); location.reload();",
        vec![],
    )
    .await
    .unwrap();
    eventually("signed in through the prefix", WAIT, async || {
        text(&c, "#who").await == "ops · operator"
    })
    .await;
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#states [data-state=IDLE] b"))
        .await
        .unwrap();
    c.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#live.on"))
        .await
        .expect("the live stream is connected through the prefix");
    pause_a1_from_its_page(&c, &base, &stack).await;
    shot(&c, "agent-under-a-prefix").await;
    no_console_errors(&c, "agent under a prefix").await;
    c.close().await.unwrap();
    worker.shutdown().await;
}

/// A reverse proxy serving the commander under `/fleet/`, as an ingress with a path prefix
/// does: each connection's request line loses the prefix, and every connection but an
/// upgrade or a stream carries one request (`Connection: close`), so each request's line
/// is rewritten. Runs until the test ends.
async fn prefix_proxy(upstream: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut lines = head.split("\r\n");
                let first = lines.next().unwrap_or_default();
                let mut parts = first.splitn(3, ' ');
                let (method, path, version) = (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                );
                let Some(rest) = path.strip_prefix("/fleet") else {
                    let _ = client
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
                let mut out = format!(
                    "{method} {} {version}\r\n",
                    if rest.is_empty() { "/" } else { rest }
                );
                for l in lines.filter(|l| !l.is_empty()) {
                    if !upgrade && l.to_ascii_lowercase().starts_with("connection:") {
                        continue;
                    }
                    out.push_str(l);
                    out.push_str("\r\n");
                }
                if !upgrade {
                    out.push_str("Connection: close\r\n");
                }
                out.push_str("\r\n");
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if server.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    format!("http://{addr}/fleet")
}
