//! One conformance suite, run against both wire protocols, with a real local HTTP server
//! that answers from a script (fleet_testkit::fake_llm).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_testkit::fake_llm::{FakeLlm, Reply, USAGE_INPUT, USAGE_OUTPUT};
use fleet_worker::message::Task;

use super::llm::Protocol;
use super::*;
use crate::config::ClassifierConfig;
use crate::registry::Registry;

fn config(endpoint: Option<String>, protocol: Protocol) -> ClassifierConfig {
    ClassifierConfig {
        endpoint,
        protocol,
        timeout_ms: 300,
        max_retries: 2,
        backoff_ms: 5,
        max_backoff_ms: 20,
        breaker_failures: 3,
        breaker_open_ms: 300,
        ..Default::default()
    }
}

/// A classifier on a clock the test moves: the breaker's open time, the cache's age and
/// the retry backoff never sleep.
fn classifier_at(
    cfg: ClassifierConfig,
    clock: Arc<crate::domain::ManualClock>,
) -> (Under, Arc<Mutex<Vec<CallRecord>>>) {
    let (
        Under {
            c,
            rubric,
            registry,
        },
        calls,
    ) = classifier(cfg);
    let c = c.with_clock(clock);
    (
        Under {
            c,
            rubric,
            registry,
        },
        calls,
    )
}

/// A classifier and the rubric and registry it classifies under (the built-in ones, as a
/// live snapshot at generation 1 would hold them).
struct Under {
    c: Classifier,
    rubric: Rubric,
    registry: Registry,
}

impl Under {
    async fn classify(&self, task: &Task, trace: Option<TraceCtx>) -> Classification {
        let g = Grounds {
            rubric: &self.rubric,
            rubric_generation: 1,
            registry: &self.registry,
        };
        self.c.classify(g, task, trace).await
    }
}

impl std::ops::Deref for Under {
    type Target = Classifier;
    fn deref(&self) -> &Classifier {
        &self.c
    }
}

fn classifier(cfg: ClassifierConfig) -> (Under, Arc<Mutex<Vec<CallRecord>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let hook: CallHook = Arc::new(move |r| c.lock().unwrap().push(r));
    let rubric = Rubric::builtin().unwrap();
    let registry = Registry::builtin().unwrap();
    let key = cfg.endpoint.as_ref().map(|_| "sk-test-secret".to_string());
    let c = Classifier::with_key(cfg, key, &rubric, Some(hook)).unwrap();
    (
        Under {
            c,
            rubric,
            registry,
        },
        calls,
    )
}

fn task(text: &str) -> Task {
    let mut t = Task::new(text);
    t.id = Some("t-1".into());
    t
}

async fn conformance(protocol: Protocol) {
    let fake = FakeLlm::start().unwrap();
    let clock = crate::domain::ManualClock::at(1_800_000_000_000);
    let (c, calls) = classifier_at(config(Some(fake.url()), protocol), clock.clone());

    // 1. A scripted answer: believed, priced, traced, and the request is the protocol's.
    fake.on(
        "pull request",
        vec![Reply::classification(
            "code_review",
            "standard",
            &["code"],
            0.9,
        )],
    );
    let got = c
        .classify(&task("Please look at pull request 42"), None)
        .await;
    assert_eq!(got.source, Source::Llm, "{got:?}");
    assert_eq!(
        (got.answer.task_type.as_str(), got.answer.tier.as_str()),
        ("code_review", "standard")
    );
    assert_eq!(got.model.as_deref(), Some("gpt-4o-mini"));
    // gpt-4o-mini: $0.15 / $0.60 per Mtok.
    let want_cost = (USAGE_INPUT as f64 * 0.15 + USAGE_OUTPUT as f64 * 0.60) / 1e6;
    assert!(
        (got.cost_usd.unwrap() - want_cost).abs() < 1e-12,
        "{:?}",
        got.cost_usd
    );
    {
        let calls = calls.lock().unwrap();
        let rec = calls.last().unwrap();
        assert_eq!(rec.provider, protocol.provider());
        assert_eq!(rec.usage.unwrap().input, USAGE_INPUT);
        assert_eq!(rec.error, None);
        assert_eq!(rec.task_id.as_deref(), Some("t-1"));
    }
    let seen = fake.seen();
    let req = seen.last().unwrap();
    assert_eq!(req.protocol, protocol.as_str());
    assert_eq!(req.body["model"], "gpt-4o-mini");
    assert!(req.user.contains("pull request 42"));
    match protocol {
        Protocol::Openai => {
            assert_eq!(req.authorization.as_deref(), Some("Bearer sk-test-secret"));
            assert_eq!(req.body["response_format"]["type"], "json_object");
            assert!(
                req.body["messages"][0]["content"]
                    .as_str()
                    .unwrap()
                    .contains("code_review")
            );
        }
        Protocol::Anthropic => {
            assert_eq!(req.api_key.as_deref(), Some("sk-test-secret"));
            assert_eq!(req.anthropic_version.as_deref(), Some("2023-06-01"));
            assert!(
                req.body["system"]
                    .as_str()
                    .unwrap()
                    .contains("summarisation")
            );
            assert!(req.body["max_tokens"].as_u64().is_some());
        }
    }

    // 2. The same content again (other case and spacing): cached, no request.
    let before = fake.requests();
    let again = c
        .classify(&task("please  LOOK at pull request 42"), None)
        .await;
    assert_eq!(again.source, Source::Cache);
    assert_eq!(again.answer, got.answer);
    assert_eq!(fake.requests(), before);

    // 3. Each failure mode: the fallback answers, with the cause, never an error.
    type Case = (
        &'static str,
        Vec<Reply>,
        Source,
        Option<&'static str>,
        usize,
    );
    let cases: Vec<Case> = vec![
        ("slow", vec![Reply::Slow(Duration::from_secs(2), Box::new(Reply::classification("research", "complex", &[], 0.9))); 3], Source::Fallback, Some("timeout"), 3),
        ("rate limited once", vec![Reply::Status(429, Some(0)), Reply::classification("research", "complex", &[], 0.9)], Source::Llm, None, 2),
        ("server errors", vec![Reply::Status(500, None); 3], Source::Fallback, Some("server_error"), 3),
        ("overloaded then fine", vec![Reply::Status(529, None), Reply::Status(503, None), Reply::classification("extraction", "simple", &["extract"], 0.8)], Source::Llm, None, 3),
        ("bad key", vec![Reply::Status(401, None)], Source::Fallback, Some("client_error"), 1),
        ("not json", vec![Reply::Text("I think this is a code review.".into())], Source::Fallback, Some("garbage"), 1),
        ("unknown type", vec![Reply::classification("poetry", "simple", &[], 0.9)], Source::Fallback, Some("garbage"), 1),
        ("unknown tier", vec![Reply::classification("research", "galaxy-brain", &[], 0.9)], Source::Fallback, Some("garbage"), 1),
        ("unknown capability", vec![Reply::classification("research", "complex", &["teleport"], 0.9)], Source::Fallback, Some("garbage"), 1),
        ("confidence out of range", vec![Reply::classification("research", "complex", &[], 7.0)], Source::Fallback, Some("garbage"), 1),
        ("extra key", vec![Reply::Text(r#"{"task_type":"research","tier":"complex","capabilities":[],"estimated_input_tokens":1,"estimated_output_tokens":1,"confidence":0.9,"note":"hi"}"#.into())], Source::Fallback, Some("garbage"), 1),
        ("negative tokens", vec![Reply::Text(r#"{"task_type":"research","tier":"complex","capabilities":[],"estimated_input_tokens":-5,"estimated_output_tokens":1,"confidence":0.9}"#.into())], Source::Fallback, Some("garbage"), 1),
        ("fenced", vec![Reply::Text("```json\n{\"task_type\":\"research\",\"tier\":\"complex\",\"capabilities\":[],\"estimated_input_tokens\":100,\"estimated_output_tokens\":50,\"confidence\":0.7}\n```".into())], Source::Llm, None, 1),
        ("not the protocol", vec![Reply::RawBody(r#"{"hello":"world"}"#.into())], Source::Fallback, Some("bad_response"), 1),
        ("html error page", vec![Reply::RawBody("<html>oops</html>".into())], Source::Fallback, Some("bad_response"), 1),
        ("refusal", vec![Reply::Refusal], Source::Fallback, Some("bad_response"), 1),
        ("unsure", vec![Reply::classification("research", "complex", &[], 0.1)], Source::Fallback, Some("low_confidence"), 1),
    ];
    for (name, replies, source, cause, requests) in cases {
        // A successful answer resets the breaker, so failures do not add up across cases.
        c.record_success();
        let before = fake.requests();
        fake.then(replies);
        let got = c
            .classify(
                &task(&format!("case {name}: summarise the quarterly report")),
                None,
            )
            .await;
        assert_eq!(got.source, source, "{name}: {got:?}");
        assert_eq!(got.fallback_cause.as_deref(), cause, "{name}: {got:?}");
        assert_eq!(fake.requests() - before, requests, "{name}: requests");
        if source == Source::Fallback {
            // The fallback's own answer, from the rubric's keywords.
            assert_eq!(got.answer.task_type, "summarisation", "{name}");
            assert!(
                got.reason.starts_with("fallback ("),
                "{name}: {}",
                got.reason
            );
        }
    }

    // 4. The breaker: three failed classifications open it; then no requests go out
    //    until it half-opens, and one good probe closes it.
    c.record_success();
    fake.reset();
    fake.otherwise(Reply::Status(500, None));
    for i in 0..3 {
        let got = c.classify(&task(&format!("breaker {i}")), None).await;
        assert_eq!(got.fallback_cause.as_deref(), Some("server_error"));
    }
    assert_eq!(c.breaker_state(), "open");
    let before = fake.requests();
    let got = c.classify(&task("breaker open"), None).await;
    assert_eq!(
        got.fallback_cause.as_deref(),
        Some("breaker_open"),
        "{got:?}"
    );
    assert_eq!(fake.requests(), before, "no request while open");
    // Still open just before breaker_open_ms (300) has passed on the classifier's clock.
    clock.advance(Duration::from_millis(299));
    let got = c.classify(&task("breaker still open"), None).await;
    assert_eq!(got.fallback_cause.as_deref(), Some("breaker_open"));
    assert_eq!(fake.requests(), before);
    clock.advance(Duration::from_millis(2));
    fake.otherwise(Reply::classification("classification", "simple", &[], 0.9));
    let got = c.classify(&task("breaker probe"), None).await;
    assert_eq!(got.source, Source::Llm, "{got:?}");
    assert_eq!(c.breaker_state(), "closed");
    assert!(c.counters.breaker_opened.get() >= 1);

    // 5. Declared type and tier: believed without a call.
    let before = fake.requests();
    let mut t = task("anything at all");
    t.attributes.insert("task_type".into(), "extraction".into());
    t.attributes.insert("tier".into(), "standard".into());
    let got = c.classify(&t, None).await;
    assert_eq!(got.source, Source::Declared);
    assert_eq!(
        (got.answer.task_type.as_str(), got.answer.tier.as_str()),
        ("extraction", "standard")
    );
    assert_eq!(fake.requests(), before);
}

#[tokio::test]
async fn conformance_openai() {
    conformance(Protocol::Openai).await;
}

#[tokio::test]
async fn conformance_anthropic() {
    conformance(Protocol::Anthropic).await;
}

#[tokio::test]
async fn connection_refused_and_no_endpoint_fall_back() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (c, calls) = classifier(config(
        Some(format!("http://127.0.0.1:{port}")),
        Protocol::Openai,
    ));
    let got = c.classify(&task("summarise this"), None).await;
    assert_eq!(got.source, Source::Fallback);
    assert_eq!(got.fallback_cause.as_deref(), Some("connect"));
    assert_eq!(got.attempts, 3);
    assert_eq!(calls.lock().unwrap().len(), 3, "each attempt is traced");

    let (c, calls) = classifier(config(None, Protocol::Openai));
    let got = c.classify(&task("summarise this"), None).await;
    assert_eq!(got.fallback_cause.as_deref(), Some("no_endpoint"));
    assert!(calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_key_variable_is_a_startup_error() {
    let mut cfg = config(Some("http://127.0.0.1:1".into()), Protocol::Openai);
    cfg.api_key_env = Some("FLEET_TEST_SURELY_UNSET_KEY".into());
    let rubric = Rubric::builtin().unwrap();
    let err = Classifier::new(cfg, &rubric, None).unwrap_err().to_string();
    assert!(err.contains("FLEET_TEST_SURELY_UNSET_KEY"), "{err}");
    assert!(!err.contains("sk-"), "never the key");
}

#[tokio::test]
async fn identical_tasks_arriving_together_make_one_call() {
    let fake = FakeLlm::start().unwrap();
    fake.otherwise(Reply::Slow(
        Duration::from_millis(100),
        Box::new(Reply::classification(
            "summarisation",
            "simple",
            &["summarise"],
            0.9,
        )),
    ));
    let (c, _) = classifier(config(Some(fake.url()), Protocol::Openai));
    let tasks: Vec<Task> = (0..20)
        .map(|_| task("Summarise the board minutes"))
        .collect();
    let got = futures::future::join_all(tasks.iter().map(|t| c.classify(t, None))).await;
    assert_eq!(fake.requests(), 1);
    assert_eq!(got.iter().filter(|g| g.source == Source::Llm).count(), 1);
    assert!(got.iter().all(|g| g.answer.task_type == "summarisation"));
    assert!(
        got.iter()
            .filter(|g| g.source == Source::Cache)
            .all(|g| g.cost_usd.is_none())
    );
    assert!(c.inflight.lock().unwrap().is_empty());
}

#[tokio::test]
async fn retries_back_off_on_the_classifiers_clock() {
    // backoff_ms 5, doubling, jittered to 50–100%: 2.5–5 ms then 5–10 ms, on the clock.
    let fake = FakeLlm::start().unwrap();
    fake.otherwise(Reply::Status(503, None));
    let t0 = 1_800_000_000_000;
    let clock = crate::domain::ManualClock::at(t0);
    let (c, _) = classifier_at(config(Some(fake.url()), Protocol::Openai), clock.clone());
    let got = c.classify(&task("always overloaded"), None).await;
    assert_eq!(got.fallback_cause.as_deref(), Some("server_error"));
    assert_eq!(fake.requests(), 3, "one call and max_retries (2) retries");
    let waited = crate::domain::Clock::now_ms(clock.as_ref()) - t0;
    assert!((7..=15).contains(&waited), "backed off {waited} ms");
}
