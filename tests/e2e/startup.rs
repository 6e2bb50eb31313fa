//! Starting up: finding (or starting) a NATS server, and saying clearly when there is none.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_testkit::{Commander, CommanderOptions, nats_server_bin};

use crate::common::{eventually_blocking, free_port};

/// The directory holding nats-server, to put on PATH.
fn nats_dir() -> PathBuf {
    let bin = nats_server_bin();
    let path = if bin.contains('/') {
        PathBuf::from(bin)
    } else {
        let out = Command::new("sh")
            .arg("-c")
            .arg("command -v nats-server")
            .output()
            .unwrap();
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    };
    path.parent().unwrap().to_path_buf()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn with_no_server_and_no_nats_binary_it_exits_saying_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[nats]\nlocal_default = \"127.0.0.1:{}\"\n[store]\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n", free_port(), dir.path()),
    )
    .unwrap();
    let empty_path = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty_path).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_commander"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("PATH", &empty_path)
        .env_remove("FLEET_NATS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no NATS server"), "{stderr}");
    assert!(stderr.contains("apt-get install nats-server"), "{stderr}");
    assert!(stderr.contains("--nats-url"), "{stderr}");
}

#[test]
fn with_no_server_it_starts_nats_server_as_a_child_and_stops_it_on_exit() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = format!(
        "{}:{}",
        nats_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut commander = Commander::start(&CommanderOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_commander")),
        nats_url: None,
        config_toml: format!(
            "[nats]\nlocal_default = \"127.0.0.1:{port}\"\n[routing]\ndefault_pool = \"p\"\n"
        ),
        data_dir: dir.path().join("cmd"),
        extra_env: vec![("PATH".into(), path)],
        extra_args: vec![],
    })
    .expect("commander starts its own nats-server");
    assert!(commander.logged("started nats-server as a child process"));
    assert!(commander.logged("connected to nats-server"));
    assert!(port_open(port));
    assert!(
        Path::new(&dir.path().join("cmd/store/nats")).exists(),
        "JetStream store under the data dir"
    );
    // It works: a task submitted over HTTP is durably accepted.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/tasks", commander.http()))
            .body(r#"{"schema":1,"description":"hello"}"#)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 202);
    assert_eq!(
        commander.terminate(Duration::from_secs(20)),
        Some(0),
        "clean exit on SIGTERM"
    );
    eventually_blocking(
        "the child nats-server stopped with the commander",
        Duration::from_secs(10),
        || !port_open(port),
    );
}

#[test]
fn config_check_reports_every_problem_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[pools.code]\ncapabilities = [\"code\"]\n").unwrap();
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(
        &syntax,
        "[nats]\nprefix = \"fleet\"\nurll = \"nats://x\"\n[intake]\nbatch_sise = 5\n[pools.code]\ncolour = 1\n",
    )
    .unwrap();
    let semantic = dir.path().join("semantic.toml");
    std::fs::write(
        &semantic,
        "[intake]\nbatch_size = 0\n[routing]\ndefault_pool = \"nope\"\n[pools.code]\n",
    )
    .unwrap();
    let run = |f: &Path| {
        Command::new(env!("CARGO_BIN_EXE_commander"))
            .args(["config", "check"])
            .arg(f)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    assert!(run(&good).status.success());
    let out = run(&syntax);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Every unknown key, each at its line and column, not only the first.
    assert!(
        err.contains("syntax.toml:3:1: unknown field `urll`")
            && err.contains("syntax.toml:5:1: unknown field `batch_sise`")
            && err.contains("syntax.toml:7:1: unknown field `colour`"),
        "{err}"
    );
    let out = run(&semantic);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Each problem at the line of its key.
    assert!(
        err.contains("semantic.toml:2: intake.batch_size")
            && err.contains("semantic.toml:4: routing.default_pool"),
        "{err}"
    );
}

#[test]
fn rubric_check_validates_against_the_registry_and_the_configs_pools() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, "[pools.code]\ncapabilities = [\"code\"]\n").unwrap();
    let builtin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../routing-rubrics/default.toml"
    );
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[classifier]\nmodel = \"gpt-4o-mini\"\ndefault_task_type = \"x\"\n\n[[task_type]]\nname = \"x\"\ndescription = \"x\"\ndefault_tier = \"t\"\n\n[[tier]]\nname = \"t\"\ndescription = \"t\"\ndefault_model = \"gpt-5-imaginary\"\n[[tier.candidate]]\nmodel = \"gpt-5-imaginary\"\npools = [\"gpu\"]\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_commander"))
            .args(["rubric", "check"])
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    // The built-in rubric is valid on its own (its pools are the example fleet's).
    assert!(run(&[builtin]).status.success());
    // Against a config without its pools, every unknown pool is named.
    let out = run(&[builtin, "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("names pool \"docs\", which is not configured"),
        "{err}"
    );
    let out = run(&[
        broken.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml:10: tier \"t\": candidate model \"gpt-5-imaginary\" is not in the model registry")
            && err.contains("names pool \"gpu\""),
        "{err}"
    );
}

#[test]
fn policy_check_and_test_run_offline_against_the_example_fleet() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_commander"))
            .arg("policy")
            .args(args)
            .current_dir(root)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let config = "simulations/fleets/example.toml";
    // The shipped policies are valid and their embedded tests pass.
    let out = run(&["test", "policies", "--config", config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(" 0 failed") && !stdout.contains("FAIL "),
        "{stdout}"
    );

    // A failing expectation fails the run and says what differed.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.policy.toml");
    std::fs::write(
        &wrong,
        "[[test]]\nname = \"reviews go to docs\"\ntask = { description = \"Review this pull request\", attributes = { task_type = \"code_review\" } }\nexpect = { action = \"dispatch\", pool = \"docs\" }\n",
    )
    .unwrap();
    let out = run(&["test", wrong.to_str().unwrap(), "--config", config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL reviews go to docs")
            && stdout.contains("pool: expected docs, got code"),
        "{stdout}"
    );

    // A broken policy is refused with file:line, and nothing else is needed to say so.
    let broken = dir.path().join("broken.policy.toml");
    std::fs::write(&broken, "[[budget]]\nname = \"b\"\nscope = \"team\"\nwindow = \"day\"\nlimit_usd = -3\naction = \"defer\"\n").unwrap();
    let out = run(&["check", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.policy.toml:5: budget b: limit_usd -3"),
        "{err}"
    );
}

/// A second commander pointed at a store another one runs on stops at once and says why
/// in words (sled's lock), leaving the first running.
#[test]
fn a_second_commander_on_the_same_store_says_another_one_holds_it() {
    let nats = fleet_testkit::NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cmd");
    let first = Commander::start(&crate::common::commander_options(&nats, data.clone(), ""))
        .expect("the first commander");
    let mut second = Command::new(env!("CARGO_BIN_EXE_commander"))
        .arg("serve")
        .arg("--config")
        .arg(data.join("commander.toml"))
        .env("FLEET_NATS_URL", nats.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    eventually_blocking(
        "the second commander exits",
        Duration::from_secs(60),
        || {
            status = second.try_wait().unwrap();
            status.is_some()
        },
    );
    assert!(!status.unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("cannot open the store in")
            && err.contains("another process holds its lock (a commander already running on this store.data_dir?)"),
        "{err}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ready = rt.block_on(async {
        reqwest::get(format!("{}/readyz", first.http()))
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(ready.ok(), Some(200), "the first one runs on");
}
