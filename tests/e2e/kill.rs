//! Crash tests: `kill -9` the commander with thousands of tasks in flight; `kill -9` a
//! worker in the middle of a task.

use std::collections::HashMap;
use std::time::Duration;

use fleet_testkit::Commander;
use fleet_worker::{Producer, ResultStatus, Subjects, SubmitOptions, Task};

use crate::common::*;

const TASKS: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_commander_with_5000_tasks_in_flight_loses_and_repeats_nothing() {
    let mut stack = Stack::start(TWO_POOLS).await;
    let seen = SeenLog::default();
    let workers = two_workers_per_pool(&stack.client, 8, Duration::from_millis(15), &seen).await;
    let producer = Producer::new(stack.client.clone(), Subjects::default());
    let mut inbox = producer.result_inbox().await.unwrap();
    let mut acks = Vec::new();
    for i in 0..TASKS {
        let mut task = Task::new(format!("kill test {i}"));
        task.pool = Some(if i % 2 == 0 { "alpha" } else { "beta" }.to_string());
        let opts = SubmitOptions {
            idempotency_key: Some(format!("kill-{i}")),
            reply_to: Some(inbox.subject().to_string()),
            ..Default::default()
        };
        acks.push(producer.submit_pipelined(&task, opts).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    // All 5,000 are accepted; let some finish, then crash the commander mid-stream.
    let mut results: HashMap<String, ResultStatus> = HashMap::new();
    while results.len() < 500 {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        results.insert(r.task_id.clone(), r.status);
    }
    stack.commander.kill9();
    let done_at_kill = results.len();
    assert!(
        done_at_kill < TASKS,
        "the commander was killed with tasks still in flight"
    );

    let opts = commander_options(
        &stack.nats,
        stack.commander.data_dir().to_path_buf(),
        TWO_POOLS,
    );
    stack.commander = Commander::start(&opts).expect("commander restarts on the same store");

    while results.len() < TASKS {
        let r = tokio::time::timeout(WAIT, inbox.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {TASKS} results after the restart",
                    results.len()
                )
            })
            .unwrap()
            .unwrap();
        assert_eq!(r.status, ResultStatus::Ok);
        results.insert(r.task_id.clone(), r.status);
    }
    eprintln!(
        "kill test: {done_at_kill} results before kill -9, {TASKS} after restart; {} duplicate forwards dropped by the inbox",
        inbox.duplicates()
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.runs.len(), TASKS, "every task ran");
        let twice: Vec<_> = seen.runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "handlers ran twice for the same task and attempt: {twice:?}"
        );
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

    let seen = SeenLog::default();
    let rescuer = recording_worker(
        &stack.client,
        "gamma",
        "rescuer",
        1,
        Duration::ZERO,
        seen.clone(),
    )
    .await;
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
