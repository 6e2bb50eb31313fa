//! Parse and validate policy documents into one [`Policy`]: every problem of every file is
//! reported at once, each as `file:line: what`. Nothing here touches the live policy; the
//! engine swaps a [`Policy`] in only when this returned one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PolicyError;
use super::schema::*;
use super::window::Window;
use crate::classify::rubric::Rubric;
use crate::config::PoolConfig;
use crate::domain::ProblemKind::{self, *};
use crate::domain::{Location, Problem};
use crate::registry::Registry;
use crate::tomlread::{from_toml, line_of};

/// The policy shipped with the commander: no budgets or throttles, the default alert
/// thresholds.
pub const BUILTIN_NAME: &str = "builtin.policy.toml";
pub const BUILTIN: &str = include_str!("../../../policies/default.policy.toml");

/// Files in a policy directory that are policy documents.
pub const SUFFIX: &str = ".policy.toml";

/// One policy file's name and text, as loaded, pushed or stored.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Document {
    pub name: String,
    pub text: String,
}

/// What validation checks names against.
#[derive(Clone, Copy, Debug)]
pub struct CheckAgainst<'a> {
    /// The configured pools; `None` (or empty) accepts any pool name.
    pub pools: Option<&'a BTreeMap<String, PoolConfig>>,
    pub registry: &'a Registry,
    pub rubric: &'a Rubric,
}

/// Where an entry was written, for `file:line` messages: the entry's header line, or the
/// line of one of its keys (a problem with `limit_usd` names the line of `limit_usd`).
#[derive(Clone, Copy, Debug)]
struct Here<'a> {
    file: &'a str,
    text: &'a str,
    start: usize,
}

impl<'a> Here<'a> {
    fn new(file: &'a str, text: &'a str, span: std::ops::Range<usize>) -> Self {
        Self {
            file,
            text,
            start: span.start,
        }
    }

    /// Where `key = …` is within this entry, else the entry's header.
    fn key(&self, key: &str) -> Location {
        let header = line_of(self.text, self.start);
        let body = self.text.get(self.start..).unwrap_or_default();
        let found = body.lines().enumerate().find_map(|(i, line)| {
            let t = line.trim_start();
            // The next table header ends the entry.
            if i > 0 && t.starts_with('[') {
                return Some(None);
            }
            let rest = t.strip_prefix(key)?;
            rest.trim_start().starts_with('=').then_some(Some(i))
        });
        let line = match found {
            Some(Some(i)) => header + i,
            _ => header,
        };
        Location::line(self.file, line)
    }

    /// The entry's header.
    fn loc(&self) -> Location {
        Location::line(self.file, line_of(self.text, self.start))
    }

    /// A problem of the entry as a whole, at its header.
    fn problem(&self, kind: ProblemKind, message: impl Into<String>) -> Problem {
        self.loc().problem(kind, message)
    }
}

impl std::fmt::Display for Here<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, line_of(self.text, self.start))
    }
}

/// A budget, validated, with where it was written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Budget {
    #[serde(flatten)]
    pub spec: BudgetSpec,
    #[serde(skip)]
    pub window: Window,
    pub at: Location,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throttle {
    #[serde(flatten)]
    pub spec: ThrottleSpec,
    /// Built once here, at validation; the live limiters use exactly these.
    #[serde(skip)]
    pub quotas: Quotas,
    pub at: Location,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reroute {
    #[serde(flatten)]
    pub spec: RerouteSpec,
    pub at: Location,
}

#[derive(Clone, Debug, Serialize)]
pub struct Redaction {
    /// The spec's name, or the one given to it (`email`, `redaction3`).
    pub rule: String,
    #[serde(flatten)]
    pub spec: RedactionSpec,
    /// `pattern`, compiled; the shipped patterns are compiled by the trace keeper.
    #[serde(skip)]
    pub regex: Option<regex::Regex>,
    pub at: Location,
}

impl PartialEq for Redaction {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestCase {
    #[serde(flatten)]
    pub spec: TestSpec,
    pub at: Location,
}

/// A validated policy: every document's sections merged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    /// `v<n>` once stored in the policy bucket; `builtin` or `unversioned` before.
    pub version: String,
    /// sha256 of the documents (names and texts, sorted by name), hex.
    pub sha256: String,
    #[serde(skip)]
    pub documents: Vec<Document>,
    pub budgets: Vec<Budget>,
    pub throttles: Vec<Throttle>,
    pub reroutes: Vec<Reroute>,
    pub alerts: AlertSpec,
    pub escalation: Vec<EscalationSpec>,
    /// Where each escalation step is written (same order).
    #[serde(skip)]
    pub escalation_at: Vec<Location>,
    pub redaction: Vec<Redaction>,
    pub privacy: PrivacySpec,
    pub sampling: SamplingSpec,
    #[serde(skip)]
    pub tests: Vec<TestCase>,
}

impl Policy {
    /// Parses and validates `documents` as one policy.
    pub fn parse(documents: Vec<Document>, against: CheckAgainst<'_>) -> Result<Self, PolicyError> {
        let mut documents = documents;
        documents.sort();
        let mut problems = Vec::new();
        let mut p = Policy {
            version: "unversioned".into(),
            sha256: bundle_sha(&documents),
            documents: Vec::new(),
            budgets: Vec::new(),
            throttles: Vec::new(),
            reroutes: Vec::new(),
            alerts: AlertSpec::default(),
            escalation: Vec::new(),
            escalation_at: Vec::new(),
            redaction: Vec::new(),
            privacy: PrivacySpec::default(),
            sampling: SamplingSpec::default(),
            tests: Vec::new(),
        };
        let mut once = Once::default();
        for doc in &documents {
            let (file, text) = (doc.name.as_str(), doc.text.as_str());
            // A file that does not read is judged on its shape alone: its entries' values
            // are checked once it reads.
            match from_toml::<PolicyFile>(text, file) {
                Ok(parsed) => {
                    let at = |span: std::ops::Range<usize>| Here::new(file, text, span);
                    p.merge(parsed, at, &mut once, against, &mut problems);
                }
                Err(shape) => problems.extend(shape),
            }
        }
        check_unique(
            p.budgets.iter().map(|b| (b.spec.name.as_str(), &b.at)),
            "budget",
            &mut problems,
        );
        check_unique(
            p.throttles.iter().map(|t| (t.spec.name.as_str(), &t.at)),
            "throttle",
            &mut problems,
        );
        check_unique(
            p.reroutes.iter().map(|r| (r.spec.from.as_str(), &r.at)),
            "reroute from pool",
            &mut problems,
        );
        check_unique(
            p.escalation
                .iter()
                .zip(&p.escalation_at)
                .map(|(e, at)| (e.name.as_str(), at)),
            "escalation",
            &mut problems,
        );
        check_unique(
            p.tests.iter().map(|t| (t.spec.name.as_str(), &t.at)),
            "test",
            &mut problems,
        );
        check_unique(
            p.redaction.iter().map(|r| (r.rule.as_str(), &r.at)),
            "redaction rule",
            &mut problems,
        );
        check_salt(&p, &mut problems);
        check_conflicts(&p.budgets, &mut problems);
        if problems.is_empty() {
            p.documents = documents;
            Ok(p)
        } else {
            Err(PolicyError::Invalid(problems))
        }
    }

    /// Adds one document's sections, each checked, to the policy being built.
    fn merge<'t>(
        &mut self,
        parsed: PolicyFile,
        at: impl Fn(std::ops::Range<usize>) -> Here<'t>,
        once: &mut Once,
        against: CheckAgainst<'_>,
        problems: &mut Vec<Problem>,
    ) {
        for b in parsed.budget {
            let here = at(b.span());
            let spec = b.into_inner();
            let window = check_budget(&spec, here, against, problems);
            self.budgets.push(Budget {
                spec,
                window: window.unwrap_or(Window::Day),
                at: here.loc(),
            });
        }
        for t in parsed.throttle {
            let here = at(t.span());
            let spec = t.into_inner();
            let quotas = check_throttle(&spec, here, against, problems);
            self.throttles.push(Throttle {
                spec,
                quotas,
                at: here.loc(),
            });
        }
        for r in parsed.reroute {
            let here = at(r.span());
            let spec = r.into_inner();
            check_reroute(&spec, here, against, problems);
            self.reroutes.push(Reroute {
                spec,
                at: here.loc(),
            });
        }
        if let Some(a) = parsed.alerts {
            let here = at(a.span());
            once.alerts(here, problems);
            let spec = a.into_inner();
            check_alerts(&spec, here, problems);
            self.alerts = spec;
        }
        for e in parsed.escalation {
            let here = at(e.span());
            let spec = e.into_inner();
            check_escalation(&spec, here, problems);
            self.escalation.push(spec);
            self.escalation_at.push(here.loc());
        }
        for r in parsed.redaction {
            let here = at(r.span());
            let spec = r.into_inner();
            let regex = check_redaction(&spec, here, problems);
            let rule = spec.name.clone().unwrap_or_else(|| match spec.builtin {
                Some(b) => b.as_str().to_string(),
                None => format!("redaction{}", self.redaction.len() + 1),
            });
            self.redaction.push(Redaction {
                rule,
                spec,
                regex,
                at: here.loc(),
            });
        }
        if let Some(s) = parsed.privacy {
            let here = at(s.span());
            once.privacy(here, problems);
            let spec = s.into_inner();
            check_keys(&spec.deny_attributes, "deny_attributes", here, problems);
            check_keys(&spec.allow_attributes, "allow_attributes", here, problems);
            self.privacy = spec;
        }
        if let Some(s) = parsed.sampling {
            let here = at(s.span());
            once.sampling(here, problems);
            let spec = s.into_inner();
            check_sampling(&spec, here, problems);
            self.sampling = spec;
        }
        for t in parsed.test {
            let here = at(t.span());
            let spec = t.into_inner();
            check_test(&spec, here, against, problems);
            self.tests.push(TestCase {
                spec,
                at: here.loc(),
            });
        }
    }

    /// The built-in policy.
    pub fn builtin(against: CheckAgainst<'_>) -> Result<Self, PolicyError> {
        let mut p = Self::parse(
            vec![Document {
                name: BUILTIN_NAME.into(),
                text: BUILTIN.into(),
            }],
            against,
        )?;
        p.version = "builtin".into();
        Ok(p)
    }

    /// One line per section for operators ("2 budgets, 1 throttle …").
    pub fn summary(&self) -> String {
        format!(
            "{} budget(s), {} throttle(s), {} reroute(s), {} escalation(s), {} redaction(s), {} test(s)",
            self.budgets.len(),
            self.throttles.len(),
            self.reroutes.len(),
            self.escalation.len(),
            self.redaction.len(),
            self.tests.len()
        )
    }

    pub fn budget(&self, name: &str) -> Option<&Budget> {
        self.budgets.iter().find(|b| b.spec.name == name)
    }
}

/// Reads every `*.policy.toml` in `dir` (not recursive), sorted by name.
pub fn read_dir(dir: &Path) -> Result<Vec<Document>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Read {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut docs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(SUFFIX) || !path.is_file() {
            continue;
        }
        docs.push(read_file(&path)?);
    }
    docs.sort();
    Ok(docs)
}

/// Reads one file; its name in errors is the path as given.
pub fn read_file(path: &Path) -> Result<Document, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Document {
        name: path.display().to_string(),
        text,
    })
}

/// sha256 of a bundle: each document's name and text, in name order.
pub fn bundle_sha(docs: &[Document]) -> String {
    let mut sorted: Vec<&Document> = docs.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for d in sorted {
        h.update(d.name.as_bytes());
        h.update([0u8]);
        h.update(d.text.as_bytes());
        h.update([0u8]);
    }
    crate::domain::hex(&h.finalize())
}

fn pool_known(against: CheckAgainst<'_>, pool: &str) -> bool {
    match against.pools {
        Some(p) if !p.is_empty() => p.contains_key(pool),
        _ => fleet_worker::protocol::is_subject_token(pool),
    }
}

/// A `hash` redaction needs `[privacy] hash_salt_env`, in whichever file sets it.
fn check_salt(p: &Policy, problems: &mut Vec<Problem>) {
    if p.privacy.hash_salt_env.is_some() {
        return;
    }
    for r in &p.redaction {
        if r.spec.action == RedactAction::Hash {
            problems.push(r.at.problem(
                Missing,
                format!(
                    "redaction {:?} hashes, but no [privacy] hash_salt_env names the salt",
                    r.rule
                ),
            ));
        }
    }
}

/// Attribute key lists: non-empty keys.
fn check_keys(keys: &[String], what: &str, here: Here<'_>, problems: &mut Vec<Problem>) {
    if keys.iter().any(|k| k.is_empty() || k == "*") {
        problems.push(here.key(what).problem(
            BadValue,
            format!("{what}: keys must be non-empty and not `*` alone (a prefix ends in `*`)"),
        ));
    }
}

/// Sections a policy may set once across all its files: where each was first set.
#[derive(Default)]
struct Once {
    alerts: Option<String>,
    sampling: Option<String>,
    privacy: Option<String>,
}

impl Once {
    fn alerts(&mut self, here: Here<'_>, problems: &mut Vec<Problem>) {
        Self::first(&mut self.alerts, "[alerts]", here, problems);
    }

    fn sampling(&mut self, here: Here<'_>, problems: &mut Vec<Problem>) {
        Self::first(&mut self.sampling, "[sampling]", here, problems);
    }

    fn privacy(&mut self, here: Here<'_>, problems: &mut Vec<Problem>) {
        Self::first(&mut self.privacy, "[privacy]", here, problems);
    }

    fn first(seen: &mut Option<String>, what: &str, here: Here<'_>, problems: &mut Vec<Problem>) {
        match seen {
            Some(first) => {
                problems.push(here.problem(Duplicate, format!("{what} is already set at {first}")))
            }
            None => *seen = Some(here.to_string()),
        }
    }
}

fn check_escalation(spec: &EscalationSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    use crate::policy::schema::{ALERT_RULES, EscalationAction as A};
    use fleet_worker::control::{MAX_TASKS_PER_S, MIN_TASKS_PER_S};
    let mut bad =
        |key: &str, message: String| problems.push(here.key(key).problem(BadValue, message));
    if !fleet_worker::protocol::is_subject_token(&spec.name) {
        bad(
            "name",
            format!(
                "escalation name {:?} must be 1-128 letters, digits, '-' or '_'",
                spec.name
            ),
        );
    }
    if !matches!(spec.severity.as_str(), "info" | "warning" | "critical") {
        bad(
            "severity",
            format!(
                "escalation severity {:?} must be \"info\", \"warning\" or \"critical\"",
                spec.severity
            ),
        );
    }
    for r in spec
        .rules
        .iter()
        .filter(|r| !ALERT_RULES.contains(&r.as_str()))
    {
        bad(
            "rules",
            format!(
                "escalation rule {r:?} is not a detector rule ({})",
                ALERT_RULES.join(", ")
            ),
        );
    }
    match (spec.action, spec.tasks_per_s) {
        (A::Throttle, None) => bad("tasks_per_s", "a throttle step needs tasks_per_s".into()),
        (A::Throttle, Some(r))
            if !(r.is_finite() && (MIN_TASKS_PER_S..=MAX_TASKS_PER_S).contains(&r)) =>
        {
            bad(
                "tasks_per_s",
                format!(
                    "tasks_per_s {r} is out of range ({MIN_TASKS_PER_S:.6} to {MAX_TASKS_PER_S})"
                ),
            )
        }
        (A::Throttle, Some(_)) | (_, None) => {}
        (other, Some(_)) => bad(
            "tasks_per_s",
            format!("tasks_per_s is for throttle steps, not {}", other.as_str()),
        ),
    }
    match (spec.action, spec.block) {
        (A::Block, None) => bad(
            "block",
            "a block step needs block (pool, model, team or feature)".into(),
        ),
        (A::Block, Some(_)) | (_, None) => {}
        (other, Some(_)) => bad(
            "block",
            format!("block is for block steps, not {}", other.as_str()),
        ),
    }
    match (spec.action, &spec.sink) {
        (A::Notify, None) => bad(
            "sink",
            "a notify step needs sink (a [[detect.sinks]] name)".into(),
        ),
        (A::Notify, Some(_)) | (_, None) => {}
        (other, Some(_)) => bad(
            "sink",
            format!("sink is for notify steps, not {}", other.as_str()),
        ),
    }
}

/// The redaction's pattern, compiled (`None` when it has none, or it does not compile).
fn check_redaction(
    spec: &RedactionSpec,
    here: Here<'_>,
    problems: &mut Vec<Problem>,
) -> Option<regex::Regex> {
    if spec.attributes.is_empty() || spec.attributes.iter().any(|a| a.is_empty()) {
        problems.push(here.key("attributes").problem(
            Missing,
            "redaction attributes must be a non-empty list of non-empty keys",
        ));
    }
    if let Some(name) = &spec.name
        && !fleet_worker::protocol::is_subject_token(name)
    {
        problems.push(here.key("name").problem(
            BadValue,
            format!("redaction name {name:?} must be one word (letters, digits, - or _)"),
        ));
    }
    if spec.pattern.is_some() && spec.builtin.is_some() {
        problems.push(here.key("builtin").problem(
            BadValue,
            "a redaction has either pattern or builtin, not both",
        ));
    }
    if spec.action != RedactAction::Replace && spec.replacement.is_some() {
        problems.push(here.key("replacement").problem(
            BadValue,
            "replacement is for replace rules; hash and drop put nothing of theirs in place",
        ));
    }
    let pat = spec.pattern.as_ref()?;
    match regex::Regex::new(pat) {
        Ok(r) => Some(r),
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().last().unwrap_or("invalid");
            problems.push(here.key("pattern").problem(
                BadValue,
                format!("redaction pattern {pat:?} does not compile: {first}"),
            ));
            None
        }
    }
}

fn check_sampling(spec: &SamplingSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    let mut rates = vec![(
        "healthy_rate".to_string(),
        here.key("healthy_rate"),
        spec.healthy_rate,
    )];
    rates.extend(spec.rule.iter().map(|r| {
        (
            format!("rule {}={}", r.attribute, r.value),
            here.key("rule"),
            r.rate,
        )
    }));
    for (what, at, v) in rates {
        if !(0.0..=1.0).contains(&v) {
            problems.push(at.problem(
                OutOfRange,
                format!("sampling {what}: {v} must be between 0 and 1"),
            ));
        }
    }
    let m = spec.cost_multiple;
    if !(m == 0.0 || (m.is_finite() && m >= 1.0)) {
        problems.push(here.key("cost_multiple").problem(
            OutOfRange,
            format!("sampling cost_multiple: {m} must be 0 (off) or at least 1"),
        ));
    }
    if spec.sentinels_per_pool_per_minute > 600 {
        problems.push(here.key("sentinels_per_pool_per_minute").problem(
            OutOfRange,
            format!(
                "sampling sentinels_per_pool_per_minute: {} is more than 600",
                spec.sentinels_per_pool_per_minute
            ),
        ));
    }
}

/// The soft thresholds: each between 0 and 1, rising, with a priority in range.
fn check_soft(b: &BudgetSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    let name = &b.name;
    let mut last = 0.0;
    for s in &b.soft {
        if !(s.at > 0.0 && s.at < 1.0) {
            problems.push(here.key("soft").problem(
                OutOfRange,
                format!(
                    "budget {name}: soft threshold {} must be between 0 and 1 (100% is the action)",
                    s.at
                ),
            ));
        } else if s.at <= last {
            problems.push(here.key("soft").problem(
                OutOfRange,
                format!(
                    "budget {name}: soft thresholds must rise ({} after {last})",
                    s.at
                ),
            ));
        }
        if s.max_priority > 9 {
            problems.push(here.key("soft").problem(
                OutOfRange,
                format!(
                    "budget {name}: soft max_priority {} is out of range 0-9",
                    s.max_priority
                ),
            ));
        }
        last = s.at;
    }
}

fn check_budget(
    b: &BudgetSpec,
    here: Here<'_>,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Window> {
    let name = &b.name;
    if name.trim().is_empty() {
        problems.push(
            here.key("name")
                .problem(Missing, "budget name must not be empty"),
        );
    }
    if !(b.limit_usd.is_finite() && b.limit_usd > 0.0) {
        problems.push(here.key("limit_usd").problem(
            OutOfRange,
            format!(
                "budget {name}: limit_usd {} must be a positive number of USD",
                b.limit_usd
            ),
        ));
    }
    let window = match Window::parse(&b.window) {
        Ok(w) => Some(w),
        Err(e) => {
            problems.push(
                here.key("window")
                    .problem(BadValue, format!("budget {name}: {e}")),
            );
            None
        }
    };
    match (b.scope, &b.matches) {
        (Scope::Fleet, Some(m)) => problems.push(here.key("match").problem(
            Conflict,
            format!("budget {name}: scope fleet takes no match (got {m:?})"),
        )),
        (Scope::Pool, Some(m)) if !pool_known(against, m) => problems.push(
            here.key("match")
                .problem(UnknownName, format!("budget {name}: unknown pool {m:?}")),
        ),
        (Scope::Model, Some(m)) if against.registry.lookup(m).is_none() => {
            problems.push(here.key("match").problem(
                UnknownName,
                format!("budget {name}: unknown model {m:?} (not in the model registry)"),
            ))
        }
        (_, Some(m)) if m.trim().is_empty() => problems.push(
            here.key("match")
                .problem(Missing, format!("budget {name}: match must not be empty")),
        ),
        _ => {}
    }
    check_soft(b, here, problems);
    if let Some(t) = &b.min_tier {
        if b.action != LimitAction::Downgrade {
            problems.push(here.key("min_tier").problem(
                Conflict,
                format!("budget {name}: min_tier only applies to action = \"downgrade\""),
            ));
        }
        if against.rubric.tier_index(t).is_none() {
            problems.push(here.key("min_tier").problem(
                UnknownName,
                format!("budget {name}: min_tier {t:?} is not a tier of the rubric ({})", against
                    .rubric
                    .tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")),
            ));
        }
    }
    window
}

fn check_throttle(
    t: &ThrottleSpec,
    here: Here<'_>,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) -> Quotas {
    let name = &t.name;
    if name.trim().is_empty() {
        problems.push(
            here.key("name")
                .problem(Missing, "throttle name must not be empty"),
        );
    }
    if t.tasks_per_s.is_none() && t.tokens_per_min.is_none() {
        problems.push(here.problem(
            Missing,
            format!("throttle {name}: set tasks_per_s, tokens_per_min or both"),
        ));
    }
    if t.scope == ThrottleScope::Pool
        && let Some(m) = &t.matches
        && !pool_known(against, m)
    {
        problems.push(
            here.key("match")
                .problem(UnknownName, format!("throttle {name}: unknown pool {m:?}")),
        );
    }
    // The ranges, and the limiter itself: built here exactly as the engine will use it.
    match t.quotas() {
        Ok(q) => q,
        Err(e) => {
            let (key, why) = e;
            problems.push(
                here.key(key)
                    .problem(BadValue, format!("throttle {name}: {why}")),
            );
            Quotas::default()
        }
    }
}

fn check_reroute(
    r: &RerouteSpec,
    here: Here<'_>,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) {
    for (what, pool) in [("from", &r.from), ("to", &r.to)] {
        if !pool_known(against, pool) {
            problems.push(here.key(what).problem(
                UnknownName,
                format!("reroute {what}: unknown pool {pool:?}"),
            ));
        }
    }
    if r.from == r.to {
        problems.push(here.key("to").problem(
            Conflict,
            format!("reroute from and to are both {:?}", r.from),
        ));
    }
    if r.error_rate_above.is_none() && r.p95_latency_ms_above.is_none() {
        problems.push(here.problem(
            Missing,
            format!(
                "reroute {}: set error_rate_above, p95_latency_ms_above or both",
                r.from
            ),
        ));
    }
    if let Some(e) = r.error_rate_above
        && !(0.0..1.0).contains(&e)
    {
        problems.push(here.key("error_rate_above").problem(
            OutOfRange,
            format!(
                "reroute {}: error_rate_above {e} must be at least 0 and below 1",
                r.from
            ),
        ));
    }
}

fn check_alerts(a: &AlertSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    for (key, v) in [
        ("context_warning", a.context_warning),
        ("context_critical", a.context_critical),
        ("fleet_error_rate", a.fleet_error_rate),
        ("queue_ratio", a.queue_ratio),
        ("tool_success_below", a.tool_success_below),
        ("token_rate_drop", a.token_rate_drop),
        ("stuck_wave_rise", a.stuck_wave_rise),
        ("cost_concentration_share", a.cost_concentration_share),
        ("cost_concentration_tasks", a.cost_concentration_tasks),
        (
            "over_provisioned_utilisation",
            a.over_provisioned_utilisation,
        ),
        ("failure_slice_fdr", a.failure_slice_fdr),
        ("distribution_jump", a.distribution_jump),
    ] {
        if !(v > 0.0 && v <= 1.0) {
            problems.push(here.key(key).problem(
                OutOfRange,
                format!("alerts.{key}: {v} must be above 0 and at most 1"),
            ));
        }
    }
    if a.context_warning >= a.context_critical {
        problems.push(here.key("context_warning").problem(
            OutOfRange,
            format!(
                "alerts.context_warning {} must be below context_critical {}",
                a.context_warning, a.context_critical
            ),
        ));
    }
    for (key, v) in [
        ("cost_rate_multiple", a.cost_rate_multiple),
        ("output_rate_multiple", a.output_rate_multiple),
        ("active_duration_multiple", a.active_duration_multiple),
        ("failure_slice_lift", a.failure_slice_lift),
        ("depth_tail_multiple", a.depth_tail_multiple),
    ] {
        if !(v.is_finite() && v > 1.0) {
            problems.push(
                here.key(key)
                    .problem(OutOfRange, format!("alerts.{key}: {v} must be above 1")),
            );
        }
    }
    for (key, v) in [
        ("renotify_s", a.renotify_s),
        ("no_data_s", a.no_data_s),
        ("min_samples", a.min_samples),
    ] {
        if v == 0 {
            problems.push(
                here.key(key)
                    .problem(OutOfRange, format!("alerts.{key} must be at least 1")),
            );
        }
    }
    for (key, v) in [
        ("min_cost_usd_per_h", a.min_cost_usd_per_h),
        ("min_tokens_per_s", a.min_tokens_per_s),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            problems.push(here.key(key).problem(
                OutOfRange,
                format!("alerts.{key}: {v} must be a number >= 0"),
            ));
        }
    }
    check_drift(a, here, problems);
    check_burst(a, here, problems);
    if a.failure_slice_min_ops == 0 || a.failure_slice_min_failures == 0 {
        problems.push(here.key("failure_slice_min_ops").problem(
            OutOfRange,
            "alerts.failure_slice_min_ops and failure_slice_min_failures must be at least 1",
        ));
    }
    if a.tool_loop_calls < 2 || a.tool_loop_critical_calls <= a.tool_loop_calls {
        problems.push(here.key("tool_loop_calls").problem(
            OutOfRange,
            format!(
                "alerts.tool_loop_calls {} must be at least 2 and below tool_loop_critical_calls {}",
                a.tool_loop_calls, a.tool_loop_critical_calls
            ),
        ));
    }
    if a.fleet_error_window_s == 0 {
        problems.push(
            here.key("fleet_error_window_s")
                .problem(OutOfRange, "alerts.fleet_error_window_s must be at least 1"),
        );
    }
}

/// The behavioural-drift keys (`drift_*`).
fn check_drift(a: &AlertSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    for (key, v, min) in [
        ("drift_interval_s", a.drift_interval_s, 10),
        ("drift_min_runs", u64::from(a.drift_min_runs), 5),
    ] {
        if v < min {
            problems.push(here.key(key).problem(
                OutOfRange,
                format!("alerts.{key} {v} must be at least {min}"),
            ));
        }
    }
    check_alarm_budget(
        "drift_false_alarms_per_hour",
        a.drift_false_alarms_per_hour,
        here,
        problems,
    );
}

/// The tool-failure-burst keys (`tool_burst_*`).
fn check_burst(a: &AlertSpec, here: Here<'_>, problems: &mut Vec<Problem>) {
    if a.tool_burst_agents < 2 {
        problems.push(here.key("tool_burst_agents").problem(
            OutOfRange,
            format!(
                "alerts.tool_burst_agents {} must be at least 2",
                a.tool_burst_agents
            ),
        ));
    }
    let window = a.tool_burst_window_s;
    let longest = crate::fleet::bursts::LISTED_MS / 1000;
    if !(5..=longest).contains(&window) {
        problems.push(here.key("tool_burst_window_s").problem(
            OutOfRange,
            format!("alerts.tool_burst_window_s {window} must be from 5 to {longest}"),
        ));
    }
    check_alarm_budget(
        "tool_burst_false_alarms_per_hour",
        a.tool_burst_false_alarms_per_hour,
        here,
        problems,
    );
}

/// A false-alarm budget per fleet-hour (`*_false_alarms_per_hour`): above 0, at most 10.
fn check_alarm_budget(key: &str, budget: f64, here: Here<'_>, problems: &mut Vec<Problem>) {
    if !(budget > 0.0 && budget <= 10.0) {
        problems.push(here.key(key).problem(
            OutOfRange,
            format!("alerts.{key} {budget} must be above 0 and at most 10"),
        ));
    }
}

fn check_test(
    t: &TestSpec,
    here: Here<'_>,
    against: CheckAgainst<'_>,
    problems: &mut Vec<Problem>,
) {
    let name = &t.name;
    if !matches!(
        t.expect.action.as_str(),
        "dispatch" | "defer" | "reject" | "throttle"
    ) {
        problems.push(here.key("expect").problem(
            BadValue,
            format!(
                "test {name:?}: expect.action {:?} must be dispatch, defer, reject or throttle",
                t.expect.action
            ),
        ));
    }
    if let Some(p) = &t.expect.pool
        && !pool_known(against, p)
    {
        problems.push(here.key("expect").problem(
            UnknownName,
            format!("test {name:?}: expect.pool: unknown pool {p:?}"),
        ));
    }
    if let Some(m) = &t.expect.model
        && against.registry.lookup(m).is_none()
    {
        problems.push(here.key("expect").problem(
            UnknownName,
            format!("test {name:?}: expect.model: unknown model {m:?}"),
        ));
    }
    for p in t.fleet.pools.keys() {
        if !pool_known(against, p) {
            problems.push(here.key("fleet").problem(
                UnknownName,
                format!("test {name:?}: fleet.pools: unknown pool {p:?}"),
            ));
        }
    }
    if t.task.priority > 9 {
        problems.push(here.key("task").problem(
            OutOfRange,
            format!("test {name:?}: task.priority must be 0-9"),
        ));
    }
    if let Some(now) = &t.now
        && t.now_ms().is_none()
    {
        problems.push(here.key("now").problem(
            BadValue,
            format!(
                "test {name:?}: now {now:?} is not an RFC 3339 instant from 1970 to 9997 (2026-06-30T23:59:00Z)"
            ),
        ));
    }
}

fn check_unique<'a>(
    items: impl Iterator<Item = (&'a str, &'a Location)>,
    what: &str,
    problems: &mut Vec<Problem>,
) {
    let mut seen: BTreeMap<&str, &Location> = BTreeMap::new();
    for (name, at) in items {
        if let Some(first) = seen.insert(name, at) {
            problems.push(at.problem(
                Duplicate,
                format!("{what} {name:?} is already defined at {first}"),
            ));
            seen.insert(name, first);
        }
    }
}

/// Two budgets over the same scope, overlapping values and the same window must agree on
/// what happens at 100%: otherwise which one wins depends on the order of files.
fn check_conflicts(budgets: &[Budget], problems: &mut Vec<Problem>) {
    let mut reported = BTreeSet::new();
    for (i, a) in budgets.iter().enumerate() {
        for b in &budgets[i + 1..] {
            let overlap = a.spec.scope == b.spec.scope
                && a.window == b.window
                && match (&a.spec.matches, &b.spec.matches) {
                    (Some(x), Some(y)) => x == y,
                    _ => true,
                };
            if overlap && a.spec.action != b.spec.action && reported.insert((i, &b.spec.name)) {
                problems.push(b.at.problem(Conflict, format!("budget {} ({} {}, {}) overlaps budget {} at {} with a conflicting action ({} vs {})", b.spec.name, b.spec.scope.as_str(), b.spec.matches.as_deref().unwrap_or("every value"), b.spec.window, a.spec.name, a.at, b.spec.action.as_str(), a.spec.action.as_str())));
            }
        }
    }
}

/// What changed from `old` to `new`, one line per change, for people.
pub fn diff(old: &Policy, new: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    named_diff(
        "budget",
        old.budgets
            .iter()
            .map(|b| (b.spec.name.as_str(), describe_budget(b))),
        new.budgets
            .iter()
            .map(|b| (b.spec.name.as_str(), describe_budget(b))),
        &mut out,
    );
    named_diff(
        "throttle",
        old.throttles
            .iter()
            .map(|t| (t.spec.name.as_str(), describe_throttle(&t.spec))),
        new.throttles
            .iter()
            .map(|t| (t.spec.name.as_str(), describe_throttle(&t.spec))),
        &mut out,
    );
    named_diff(
        "reroute",
        old.reroutes
            .iter()
            .map(|r| (r.spec.from.as_str(), describe_reroute(&r.spec))),
        new.reroutes
            .iter()
            .map(|r| (r.spec.from.as_str(), describe_reroute(&r.spec))),
        &mut out,
    );
    if old.alerts != new.alerts {
        let (a, b) = (
            serde_json::to_value(&old.alerts).unwrap_or_default(),
            serde_json::to_value(&new.alerts).unwrap_or_default(),
        );
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, v) in b {
                if a.get(k) != Some(v) {
                    out.push(format!(
                        "alerts.{k}: {} → {v}",
                        a.get(k).map(|x| x.to_string()).unwrap_or_default()
                    ));
                }
            }
        }
    }
    if old.escalation != new.escalation {
        out.push(format!(
            "escalation: {} → {} rule(s)",
            old.escalation.len(),
            new.escalation.len()
        ));
    }
    if old.redaction != new.redaction {
        out.push(format!(
            "redaction: {} → {} rule(s)",
            old.redaction.len(),
            new.redaction.len()
        ));
    }
    if old.privacy != new.privacy {
        out.push("privacy: shipped rules, attribute lists or salt changed".to_string());
    }
    if old.sampling != new.sampling {
        out.push(format!(
            "sampling: healthy rate {} → {}, {} → {} rule(s)",
            old.sampling.healthy_rate,
            new.sampling.healthy_rate,
            old.sampling.rule.len(),
            new.sampling.rule.len()
        ));
    }
    let (ot, nt) = (old.tests.len(), new.tests.len());
    if ot != nt {
        out.push(format!("tests: {ot} → {nt}"));
    }
    let old_docs: BTreeSet<&str> = old.documents.iter().map(|d| d.name.as_str()).collect();
    let new_docs: BTreeSet<&str> = new.documents.iter().map(|d| d.name.as_str()).collect();
    for d in new_docs.difference(&old_docs) {
        out.push(format!("file {d} added"));
    }
    for d in old_docs.difference(&new_docs) {
        out.push(format!("file {d} removed"));
    }
    if out.is_empty() {
        out.push(if old.sha256 == new.sha256 {
            "no change".into()
        } else {
            "no change in effect (comments or layout only)".into()
        });
    }
    out
}

fn named_diff<'a>(
    what: &str,
    old: impl Iterator<Item = (&'a str, String)>,
    new: impl Iterator<Item = (&'a str, String)>,
    out: &mut Vec<String>,
) {
    let old: BTreeMap<&str, String> = old.collect();
    let new: BTreeMap<&str, String> = new.collect();
    for (name, desc) in &new {
        match old.get(name) {
            None => out.push(format!("{what} {name} added: {desc}")),
            Some(o) if o != desc => out.push(format!("{what} {name} changed: {o} → {desc}")),
            Some(_) => {}
        }
    }
    for (name, desc) in &old {
        if !new.contains_key(name) {
            out.push(format!("{what} {name} removed (was {desc})"));
        }
    }
}

fn describe_budget(b: &Budget) -> String {
    let s = &b.spec;
    let mut d = format!(
        "{} {} ${}/{} → {}",
        s.scope.as_str(),
        s.matches.as_deref().unwrap_or("*"),
        super::window::usd(s.limit_usd),
        s.window,
        s.action.as_str()
    );
    for soft in &s.soft {
        let _ = write!(d, ", {:.0}% {:?}", soft.at * 100.0, soft.action);
    }
    d
}

fn describe_throttle(t: &ThrottleSpec) -> String {
    let mut d = format!(
        "{} {}",
        t.scope.as_str(),
        t.matches.as_deref().unwrap_or("*")
    );
    if let Some(r) = t.tasks_per_s {
        let _ = write!(d, " {r} tasks/s");
    }
    if let Some(r) = t.tokens_per_min {
        let _ = write!(d, " {r} tokens/min");
    }
    if let Some(b) = t.burst {
        let _ = write!(d, " burst {b}");
    }
    d
}

fn describe_reroute(r: &RerouteSpec) -> String {
    let mut d = format!("→ {}", r.to);
    if let Some(e) = r.error_rate_above {
        let _ = write!(d, " when errors > {:.0}%", e * 100.0);
    }
    if let Some(l) = r.p95_latency_ms_above {
        let _ = write!(d, " when p95 > {l} ms");
    }
    d
}
