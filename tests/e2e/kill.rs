//! Crash tests: `kill -9` the commander ten times with thousands of tasks in flight; `kill -9` a
//! worker in the middle of a task; `kill -9` the commander as the first result lands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_testkit::Commander;
use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};
use futures::StreamExt;

use crate::common::*;

const TASKS: usize = 5_000;
const KILLS: usize = 10;
/// Submissions per second: below the fleet's capacity, so a task's wait is the crash's.
const RATE: u64 = 250;

/// The commander is `kill -9`ed ten times while 5,000 tasks arrive at a steady rate, and
/// restarted on the same store each time: nothing is lost (a recorded dispatch keeps its
/// decision), no handler runs twice, the budget every task counts against holds exactly
/// what the tasks' records say they were charged (nothing reserved or charged twice), and
/// the longest wait a producer sees is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_commander_ten_times_during_5000_tasks_loses_and_repeats_nothing() {
    // A short intake ack wait keeps the test short: the tasks the dead commander had read
    // wait that long to be handed to the new one (`FLEET_KILL_TEST_ACK_WAIT` to measure
    // with another, such as the default 10 s).
    let ack_wait = std::env::var("FLEET_KILL_TEST_ACK_WAIT").unwrap_or_else(|_| "2".into());
    // A fleet budget no task reaches: every dispatch reserves in it, every result charges.
    // A calendar month, so the check at the end sees every task's bucket (a run that
    // crosses the turn of a month would not).
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("fleet.policy.toml"),
        "[[budget]]\nname = \"fleet-month\"\nscope = \"fleet\"\nwindow = \"month\"\nlimit_usd = 1000000.0\naction = \"defer\"\n",
    )
    .unwrap();
    let toml = format!(
        "{TWO_POOLS}\n[intake]\nack_wait_secs = {ack_wait}\n[policy]\ndir = {:?}\n",
        policies.path()
    );
    let mut stack = Stack::start(&toml).await;
    let seen = SeenLog::default();
    let workers = two_workers_per_pool(&stack.client, 8, Duration::from_millis(15), &seen).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let reply_to = inbox.subject().to_string();

    let accepted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let submitter = {
        let (producer, accepted_at) = (producer.clone(), accepted_at.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            for i in 0..TASKS {
                tick.tick().await;
                let mut task = Task::new(format!("kill test {i}"));
                task.pool = Some(if i % 2 == 0 { "alpha" } else { "beta" }.to_string());
                let opts = SubmitOptions {
                    idempotency_key: Some(format!("kill-{i}")),
                    reply_to: Some(reply_to.clone()),
                    ..Default::default()
                };
                // The broker takes submissions while the commander is down.
                producer.submit(&task, opts).await.unwrap();
                accepted_at
                    .lock()
                    .unwrap()
                    .insert(format!("kill-{i}"), Instant::now());
            }
        })
    };
    let done: Arc<Mutex<HashMap<String, (ResultStatus, Instant)>>> = Arc::default();
    let collector = {
        let done = done.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbox.next().await {
                let mut d = done.lock().unwrap();
                d.insert(r.task_id.clone(), (r.status, Instant::now()));
                if d.len() == TASKS {
                    break;
                }
            }
            inbox.duplicates()
        })
    };

    for k in 1..=KILLS {
        let at = k * TASKS / (KILLS + 1);
        eventually("results reach the next crash point", WAIT, async || {
            done.lock().unwrap().len() >= at
        })
        .await;
        stack.commander.kill9();
        let opts = commander_options(&stack.nats, stack.commander.data_dir().to_path_buf(), &toml);
        stack.commander = Commander::start(&opts).expect("commander restarts on the same store");
    }
    submitter.await.unwrap();
    let duplicates = tokio::time::timeout(WAIT, collector)
        .await
        .unwrap_or_else(|_| panic!("only {} of {TASKS} results", done.lock().unwrap().len()))
        .unwrap();

    let mut waits: Vec<Duration> = {
        let (done, accepted_at) = (done.lock().unwrap(), accepted_at.lock().unwrap());
        assert!(done.values().all(|(s, _)| *s == ResultStatus::Ok));
        done.iter()
            .filter_map(|(id, (_, at))| {
                accepted_at
                    .get(id)
                    .map(|a| at.saturating_duration_since(*a))
            })
            .collect()
    };
    waits.sort();
    eprintln!(
        "commander kill test: {TASKS} tasks at {RATE}/s, {KILLS} kill -9s, intake ack wait {ack_wait} s; wait from PubAck to result: median {:?}, p99 {:?}, longest {:?}; {duplicates} duplicate forwards dropped by the inbox",
        waits[waits.len() / 2],
        waits[waits.len() * 99 / 100],
        waits[waits.len() - 1],
    );
    {
        let seen = seen.lock().unwrap();
        let runs = seen.runs_per_task();
        assert_eq!(runs.len(), TASKS, "every task ran");
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "handlers ran twice: {twice:?}");
    }
    // The restarted commander's store knows every task finished.
    let http = stack.commander.http().to_string();
    eventually("every task recorded as completed", WAIT, async || {
        for i in (0..TASKS).step_by(50) {
            match task_record(&http, &format!("kill-{i}")).await {
                Some(rec) if rec["state"] == "completed" => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    // And its decision log: every sampled task names its routing decision, and it is
    // served. A record is never on disk naming a decision that is not (the decision is
    // appended first); a task whose dispatch was never recorded (the commander died
    // between its PubAck and the flush, and its result landed first) is decided again for
    // the record when its submission comes back (docs/rubrics.md): counted as recovered.
    let mut recovered = Vec::new();
    for i in (0..TASKS).step_by(50) {
        let id = format!("kill-{i}");
        let rec = task_record(&http, &id).await.expect("recorded");
        assert!(
            rec["decision_at_ms"].is_u64(),
            "{id} names no decision: {rec}"
        );
        let d = stack.get_json(&format!("/v1/decisions/{id}")).await;
        assert_eq!(d["task_id"], id.as_str());
        assert_eq!(d["id"], rec["decision_id"], "{d}");
        assert_eq!(d["outcome"], "dispatched", "{d}");
        if d["recovered"] == true {
            recovered.push(id);
        }
    }
    eprintln!(
        "decisions after the kills: all {} sampled found; decided again for the record (dispatch never recorded): {recovered:?}",
        TASKS / 50
    );
    // The budget: nothing is left reserved, and what is spent is the sum of the charges
    // the records hold. A reservation or charge made durable without its record (and so
    // made again when the batch was redelivered) would show here.
    // One client for all 5,000 reads (building one per request is most of a debug build's
    // time for it).
    let client = reqwest::Client::new();
    let charges: Vec<f64> = futures::stream::iter(0..TASKS)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{http}/v1/tasks/kill-{i}"));
            async move {
                let rec: serde_json::Value =
                    client.get(url).send().await.unwrap().json().await.unwrap();
                rec["budget"]["charged_usd"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("kill-{i} has no charge: {rec}"))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let charged: f64 = charges.iter().sum();
    let st = &stack.get_json("/v1/policy").await["standing"][0];
    let (spent, reserved) = (
        st["spent_usd"].as_f64().unwrap(),
        st["reserved_usd"].as_f64().unwrap(),
    );
    eprintln!(
        "budget after the kills: spent ${spent:.9}, reserved ${reserved:.9}; the {TASKS} records' charges add up to ${charged:.9}"
    );
    assert!(charged > 0.0);
    assert!(reserved.abs() < 1e-9, "left reserved: {st}");
    assert!(
        (spent - charged).abs() <= charged * 1e-9,
        "spent ${spent} against ${charged} charged: {st}"
    );
    for w in workers {
        w.shutdown().await;
    }
}

/// A worker process dies mid-task: JetStream redelivers after the ack wait, another worker
/// finishes the task, the producer gets one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_worker_mid_task_redelivers_to_another_worker() {
    let toml = "[intake]\nwork_ack_wait_secs = 2\n[pools.gamma]\n";
    let stack = Stack::start(toml).await;
    // The SDK's example worker, a real process; `cargo test` builds examples.
    let bin = fleet_testkit::sibling_bin("examples/worker");
    let mut crashy = std::process::Command::new(&bin)
        .args(["--pool", "gamma", "--id", "crashy", "--work-ms", "3600000"])
        .args(["--nats-url", stack.nats.url()])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); build it with `cargo build -p fleet-worker --examples`",
                bin.display()
            )
        });
    let output = crashy.stderr.take().unwrap();
    // Killed on drop too, so a failing assertion cannot leave it running.
    let mut crashy = KillOnDrop(crashy);
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("task started") {
                let _ = tx.send(line);
            }
        }
    });
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut task = Task::new("outlive a crash");
    task.pool = Some("gamma".into());
    let receipt = producer
        .submit(
            &task,
            SubmitOptions {
                idempotency_key: Some("crash-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::timeout(WAIT, started.recv())
        .await
        .expect("the hanging worker took the task");
    crashy.0.kill().unwrap();
    crashy.0.wait().unwrap();

    let (seen, rescuer) = watched_worker(&stack.client, "gamma", "rescuer", 1).await;
    let result = producer.await_result(&receipt.task_id, WAIT).await.unwrap();
    assert_eq!(result.status, ResultStatus::Ok);
    assert_eq!(result.worker_id.as_deref(), Some("rescuer"));
    let runs = seen.lock().unwrap().runs.clone();
    assert_eq!(runs.get(&("crash-1".to_string(), 1)), Some(&1));
    rescuer.shutdown().await;
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A result the producer holds is on the commander's disk: the commander is `kill -9`ed
/// the moment the first result arrives, and every task whose result came back is
/// `completed` in the store of the commander started next. (Results were once forwarded
/// before the batch's flush: 3 runs in 8 of this test lost records the producer had been
/// told about, some of them entirely.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_result_a_producer_received_is_on_disk_when_the_commander_dies_at_once() {
    const N: usize = 400;
    // A long ack wait: the restarted commander is not handed the dead one's unacked
    // results during the check, so its records are what the dead one made durable.
    let toml = format!("{TWO_POOLS}\n[intake]\nack_wait_secs = 60\n");
    let mut stack = Stack::start(&toml).await;
    let (_seen, worker) = watched_worker(&stack.client, "alpha", "a1", 64).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut acks = Vec::with_capacity(N);
    for i in 0..N {
        let mut task = Task::new(format!("held {i}"));
        task.pool = Some("alpha".into());
        let opts = SubmitOptions {
            idempotency_key: Some(format!("held-{i}")),
            reply_to: Some(inbox.subject().to_string()),
            ..Default::default()
        };
        acks.push(producer.submit_pipelined(&task, opts).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }

    let mut received = Vec::new();
    while received.is_empty() {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .expect("results arrive")
            .unwrap()
            .unwrap();
        received.push(r.task_id);
    }
    stack.commander.kill9();
    // Results forwarded before the kill that were still on their way.
    while let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await
    {
        received.push(r.task_id);
    }

    let opts = commander_options(&stack.nats, stack.commander.data_dir().to_path_buf(), &toml);
    stack.commander = Commander::start(&opts).expect("commander restarts");
    let mut not_stored = Vec::new();
    for id in &received {
        let state = task_record(stack.commander.http(), id)
            .await
            .map(|r| r["state"].clone());
        if state.as_ref().and_then(|s| s.as_str()) != Some("completed") {
            not_stored.push(format!("{id}: {state:?}"));
        }
    }
    assert!(
        not_stored.is_empty(),
        "{} of the {} results the producer received are not completed in the store: {}",
        not_stored.len(),
        received.len(),
        not_stored.join(", ")
    );
    worker.shutdown().await;
}
