//! Redaction of kept traces before they are stored or exported: the policy's
//! `[[redaction]]` rules in order, then the shipped ones, then `[privacy]`'s attribute
//! lists. Applied to resource, scope, span, event and link attributes (GenAI message
//! content and tool call arguments and results are span or event attributes) and to span
//! status messages. Counted per rule.
//!
//! The identifiers and figures the fleet reads (`IS_PROTECTED`) are out of reach of `*`
//! rules and the allow list: a trace keeps its tokens, models and ids. A rule reaches them
//! only by naming them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use regex::{Captures, Regex};
use sha2::Sha256;

use crate::policy::Policy;
use crate::policy::schema::{BuiltinPattern, RedactAction};

/// The key a span's status message is matched under.
pub const STATUS_MESSAGE_KEY: &str = "otel.status_description";

/// Identifiers and figures kept whole unless a rule names them (docs/traces.md).
pub fn is_protected(key: &str) -> bool {
    key.starts_with("gen_ai.usage.")
        || key.starts_with("fleet.")
        || matches!(
            key,
            "gen_ai.operation.name"
                | "gen_ai.provider.name"
                | "gen_ai.system"
                | "gen_ai.request.model"
                | "gen_ai.response.model"
                | "gen_ai.response.id"
                | "gen_ai.response.finish_reasons"
                | "gen_ai.agent.id"
                | "gen_ai.agent.name"
                | "gen_ai.agent.version"
                | "gen_ai.tool.name"
                | "gen_ai.tool.call.id"
                | "gen_ai.tool.type"
                | "gen_ai.conversation.id"
                | "service.name"
                | "service.instance.id"
                | "service.version"
                | "error.type"
                | "messaging.message.id"
                | "messaging.destination.name"
        )
}

/// Attribute keys: exact, or prefixes ending in `*`; `*` alone matches every key that is
/// not protected.
#[derive(Clone, Debug, Default)]
struct Keys {
    exact: Vec<String>,
    prefixes: Vec<String>,
    every: bool,
}

impl Keys {
    fn new(keys: &[String]) -> Self {
        let mut k = Keys::default();
        for key in keys {
            if key == "*" {
                k.every = true;
            } else if let Some(p) = key.strip_suffix('*') {
                k.prefixes.push(p.to_string());
            } else {
                k.exact.push(key.clone());
            }
        }
        k
    }

    fn is_empty(&self) -> bool {
        !self.every && self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Named explicitly (exactly or by a prefix).
    fn names(&self, key: &str) -> bool {
        self.exact.iter().any(|e| e == key) || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    fn matches(&self, key: &str) -> bool {
        self.names(key) || (self.every && !is_protected(key))
    }
}

#[derive(Clone, Debug)]
enum Matcher {
    Whole,
    Pattern(Regex),
    /// Candidates that must also pass the Luhn check.
    Card(Regex),
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    keys: Keys,
    matcher: Matcher,
    action: RedactAction,
    replacement: String,
}

/// The compiled rules of one policy.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    rules: Vec<Rule>,
    deny: Keys,
    allow: Keys,
    salt: Option<Vec<u8>>,
}

/// What one pass changed, per rule (`deny_attributes` and `allow_attributes` count as
/// rules of those names).
pub type Counts = BTreeMap<String, u64>;

fn builtin(b: BuiltinPattern) -> (Option<&'static Regex>, &'static str) {
    static EMAIL: LazyLock<Option<Regex>> = LazyLock::new(|| {
        re(
            r"(?i)\b[a-z0-9][a-z0-9._%+-]*@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.[a-z]{2,}\b",
        )
    });
    static PHONE: LazyLock<Option<Regex>> = LazyLock::new(|| {
        re(
            r"(?:\+\d{8,15}\b|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\b\d{1,4}[ .-])\d{3,4}[ .-]?\d{3,4}\b)",
        )
    });
    static CARD: LazyLock<Option<Regex>> = LazyLock::new(|| re(r"\b(?:\d[ -]?){12,18}\d\b"));
    static API_KEY: LazyLock<Option<Regex>> = LazyLock::new(|| {
        re(concat!(
            r"\b(?:sk|pk|rk)-(?:[a-z]+-)?[A-Za-z0-9_-]{16,}",
            r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            r"|\bgh[pousr]_[A-Za-z0-9]{30,}",
            r"|\bgithub_pat_[A-Za-z0-9_]{30,}",
            r"|\bxox[abposr]-[A-Za-z0-9-]{10,}",
            r"|\bAIza[0-9A-Za-z_-]{35}",
            r"|\bglpat-[A-Za-z0-9_-]{20,}",
        ))
    });
    static BEARER: LazyLock<Option<Regex>> = LazyLock::new(|| {
        re(
            r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}|\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}",
        )
    });
    static IP: LazyLock<Option<Regex>> = LazyLock::new(|| {
        re(concat!(
            r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
            r"|\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b",
            r"|\b(?:[0-9a-fA-F]{1,4}:){1,7}:(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4}){0,6})?",
            r"|::(?:[fF]{4}:)?[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4}){0,6}\b",
        ))
    });
    match b {
        BuiltinPattern::Email => (EMAIL.as_ref(), "[EMAIL]"),
        BuiltinPattern::Phone => (PHONE.as_ref(), "[PHONE]"),
        BuiltinPattern::PaymentCard => (CARD.as_ref(), "[CARD]"),
        BuiltinPattern::ApiKey => (API_KEY.as_ref(), "[API_KEY]"),
        BuiltinPattern::BearerToken => (BEARER.as_ref(), "[TOKEN]"),
        BuiltinPattern::IpAddress => (IP.as_ref(), "[IP]"),
    }
}

/// The shipped patterns are constants that a test compiles; were one ever to fail, its
/// rule would be replaced by one that takes the whole value (`builtin_matcher`).
fn re(p: &str) -> Option<Regex> {
    Regex::new(p).ok()
}

/// The Luhn check of the digits of `s`.
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl Redactor {
    /// Compiles `policy`'s rules. `salt` is the value of `[privacy] hash_salt_env` (read
    /// by the caller from the environment).
    pub fn new(policy: &Policy, salt: Option<Vec<u8>>) -> Self {
        let mut rules = Vec::new();
        for r in &policy.redaction {
            let (matcher, default_replacement) = match (&r.regex, r.spec.builtin) {
                (Some(re), _) => (Matcher::Pattern(re.clone()), "[REDACTED]"),
                (None, Some(b)) => builtin_matcher(b),
                // A pattern that did not compile never gets here (the policy is refused).
                (None, None) => (Matcher::Whole, "[REDACTED]"),
            };
            rules.push(Rule {
                name: r.rule.clone(),
                keys: Keys::new(&r.spec.attributes),
                matcher,
                action: r.spec.action,
                replacement: r
                    .spec
                    .replacement
                    .clone()
                    .unwrap_or_else(|| default_replacement.to_string()),
            });
        }
        if policy.privacy.default_rules {
            for b in BuiltinPattern::ALL {
                let (matcher, replacement) = builtin_matcher(b);
                rules.push(Rule {
                    name: b.as_str().to_string(),
                    keys: Keys::new(&["*".to_string()]),
                    matcher,
                    action: RedactAction::Replace,
                    replacement: replacement.to_string(),
                });
            }
        }
        Self {
            rules,
            deny: Keys::new(&policy.privacy.deny_attributes),
            allow: Keys::new(&policy.privacy.allow_attributes),
            salt: salt.filter(|s| !s.is_empty()),
        }
    }

    /// Redacts every attribute of `rs` in place.
    pub fn apply(&self, rs: &mut [ResourceSpans], counts: &mut Counts) {
        for r in rs {
            if let Some(res) = &mut r.resource {
                self.attributes(&mut res.attributes, counts);
            }
            for ss in &mut r.scope_spans {
                if let Some(scope) = &mut ss.scope {
                    self.attributes(&mut scope.attributes, counts);
                }
                for span in &mut ss.spans {
                    self.attributes(&mut span.attributes, counts);
                    for e in &mut span.events {
                        self.attributes(&mut e.attributes, counts);
                    }
                    for l in &mut span.links {
                        self.attributes(&mut l.attributes, counts);
                    }
                    if let Some(st) = &mut span.status
                        && !st.message.is_empty()
                        && let Some(new) = self.text(STATUS_MESSAGE_KEY, &st.message, counts)
                    {
                        st.message = new;
                    }
                }
            }
        }
    }

    fn attributes(&self, attrs: &mut Vec<KeyValue>, counts: &mut Counts) {
        attrs.retain_mut(|kv| self.keep(kv, counts));
    }

    /// Redacts one attribute; false when it is to be removed.
    fn keep(&self, kv: &mut KeyValue, counts: &mut Counts) -> bool {
        let key = kv.key.as_str();
        if self.deny.names(key) {
            bump(counts, "deny_attributes");
            return false;
        }
        if !self.allow.is_empty() && !self.allow.names(key) && !is_protected(key) {
            bump(counts, "allow_attributes");
            return false;
        }
        let Some(value) = kv.value.as_mut() else {
            return true;
        };
        self.value(&kv.key, value, counts)
    }

    /// Redacts a value (strings inside arrays and maps too); false when a drop rule
    /// matched it.
    fn value(&self, key: &str, v: &mut AnyValue, counts: &mut Counts) -> bool {
        match &mut v.value {
            Some(any_value::Value::StringValue(s)) => {
                if self.drops(key, s, counts) {
                    return false;
                }
                if let Some(new) = self.text(key, s, counts) {
                    *s = new;
                }
                true
            }
            Some(any_value::Value::ArrayValue(a)) => {
                a.values.retain_mut(|x| self.value(key, x, counts));
                true
            }
            Some(any_value::Value::KvlistValue(l)) => {
                // Nested keys are read under their parent's key too: a rule on
                // `gen_ai.input.messages` covers everything inside it.
                l.values.retain_mut(|kv| {
                    if self.deny.names(&kv.key) {
                        bump(counts, "deny_attributes");
                        return false;
                    }
                    match kv.value.as_mut() {
                        Some(x) => self.value(key, x, counts),
                        None => true,
                    }
                });
                true
            }
            Some(any_value::Value::BytesValue(_)) => {
                // Opaque bytes are not read: only a rule naming the key touches them.
                !self.rules.iter().any(|r| {
                    let hit = r.action == RedactAction::Drop && r.keys.names(key);
                    if hit {
                        bump(counts, &r.name);
                    }
                    hit
                })
            }
            _ => {
                // Numbers and booleans: a drop rule naming the key removes them.
                !self.rules.iter().any(|r| {
                    let hit = r.action == RedactAction::Drop
                        && matches!(r.matcher, Matcher::Whole)
                        && r.keys.names(key);
                    if hit {
                        bump(counts, &r.name);
                    }
                    hit
                })
            }
        }
    }

    fn drops(&self, key: &str, s: &str, counts: &mut Counts) -> bool {
        for r in &self.rules {
            if r.action != RedactAction::Drop || !r.keys.matches(key) {
                continue;
            }
            let hit = match &r.matcher {
                Matcher::Whole => true,
                Matcher::Pattern(re) => re.is_match(s),
                Matcher::Card(re) => re.find_iter(s).any(|m| luhn(m.as_str())),
            };
            if hit {
                bump(counts, &r.name);
                return true;
            }
        }
        false
    }

    /// The text with every replace and hash rule applied; `None` when nothing matched.
    fn text(&self, key: &str, s: &str, counts: &mut Counts) -> Option<String> {
        let mut cur: Cow<'_, str> = Cow::Borrowed(s);
        for r in &self.rules {
            if r.action == RedactAction::Drop || !r.keys.matches(key) {
                continue;
            }
            let mut n = 0u64;
            let next = match &r.matcher {
                Matcher::Whole => {
                    n = 1;
                    Cow::Owned(self.put(r, &cur))
                }
                Matcher::Pattern(re) => match re.replace_all(&cur, |c: &Captures<'_>| {
                    n += 1;
                    self.put(r, &c[0])
                }) {
                    Cow::Borrowed(_) => continue,
                    Cow::Owned(o) => Cow::Owned(o),
                },
                Matcher::Card(re) => match re.replace_all(&cur, |c: &Captures<'_>| {
                    if luhn(&c[0]) {
                        n += 1;
                        self.put(r, &c[0])
                    } else {
                        c[0].to_string()
                    }
                }) {
                    Cow::Borrowed(_) => continue,
                    Cow::Owned(o) => Cow::Owned(o),
                },
            };
            if n > 0 {
                *counts.entry(r.name.clone()).or_default() += n;
                cur = next;
            }
        }
        match cur {
            Cow::Borrowed(_) => None,
            Cow::Owned(o) => Some(o),
        }
    }

    /// What replaces `matched` under `r`.
    fn put(&self, r: &Rule, matched: &str) -> String {
        match (r.action, &self.salt) {
            (RedactAction::Hash, Some(salt)) => hash(salt, matched),
            _ => r.replacement.clone(),
        }
    }
}

fn builtin_matcher(b: BuiltinPattern) -> (Matcher, &'static str) {
    let (re, replacement) = builtin(b);
    let m = match re {
        Some(re) if b == BuiltinPattern::PaymentCard => Matcher::Card(re.clone()),
        Some(re) => Matcher::Pattern(re.clone()),
        // Fails closed: nothing of the value survives.
        None => Matcher::Whole,
    };
    (m, replacement)
}

fn bump(counts: &mut Counts, rule: &str) {
    match counts.get_mut(rule) {
        Some(n) => *n += 1,
        None => {
            counts.insert(rule.to_string(), 1);
        }
    }
}

/// `hash:` and the first 16 hex digits of HMAC-SHA256(salt, value).
pub fn hash(salt: &[u8], value: &str) -> String {
    // HMAC takes a key of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(salt) else {
        return "[REDACTED]".into();
    };
    mac.update(value.as_bytes());
    let out = mac.finalize().into_bytes();
    format!("hash:{}", crate::domain::hex(&out[..8]))
}

/// Every shipped pattern compiles.
#[cfg(test)]
pub(crate) fn builtins_compile() -> bool {
    BuiltinPattern::ALL.iter().all(|b| builtin(*b).0.is_some())
}
