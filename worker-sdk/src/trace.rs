//! W3C Trace Context (Level 2) and W3C Baggage, as carried in NATS headers.
//!
//! Written here rather than taken from an OpenTelemetry propagator because the commander must
//! say *why* a `traceparent` was refused (the value and the reason land on the dispatch span),
//! while library propagators silently return an invalid context; and because a worker should
//! not need the whole OpenTelemetry SDK to continue a trace.

use std::collections::BTreeMap;
use std::fmt;

use rand::RngCore;

/// A 16-byte trace id. Never all zeros once constructed through this module.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id. Never all zeros once constructed through this module.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random, non-zero trace id (W3C Level 2: the whole id is random, so the
    /// random-trace-id flag may be set).
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        loop {
            rand::rng().fill_bytes(&mut bytes);
            if bytes != [0; 16] {
                return Self(bytes);
            }
        }
    }

    /// Lowercase hex, 32 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 lowercase hex characters, refusing all zeros.
    pub fn from_hex(s: &str) -> Result<Self, TraceParentError> {
        let bytes = parse_hex::<16>(s).ok_or(TraceParentError::BadTraceId)?;
        if bytes == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        Ok(Self(bytes))
    }
}

impl SpanId {
    /// A random, non-zero span id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        loop {
            rand::rng().fill_bytes(&mut bytes);
            if bytes != [0; 8] {
                return Self(bytes);
            }
        }
    }

    /// Lowercase hex, 16 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 16 lowercase hex characters, refusing all zeros.
    pub fn from_hex(s: &str) -> Result<Self, TraceParentError> {
        let bytes = parse_hex::<8>(s).ok_or(TraceParentError::BadSpanId)?;
        if bytes == [0; 8] {
            return Err(TraceParentError::ZeroSpanId);
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a `traceparent` value was refused. The caller starts a new trace and records this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    #[error("traceparent is shorter than 55 characters")]
    TooShort,
    #[error("traceparent version 00 must be exactly 55 characters")]
    BadLength,
    #[error("traceparent fields must be separated by '-'")]
    BadDelimiter,
    #[error("traceparent version is not two lowercase hex characters")]
    BadVersion,
    #[error("traceparent version ff is forbidden")]
    ForbiddenVersion,
    #[error("trace-id is not 32 lowercase hex characters")]
    BadTraceId,
    #[error("trace-id is all zeros")]
    ZeroTraceId,
    #[error("parent-id is not 16 lowercase hex characters")]
    BadSpanId,
    #[error("parent-id is all zeros")]
    ZeroSpanId,
    #[error("trace-flags are not two lowercase hex characters")]
    BadFlags,
}

/// The sampled bit of trace-flags.
pub const FLAG_SAMPLED: u8 = 0x01;
/// The random-trace-id bit of trace-flags (W3C Level 2).
pub const FLAG_RANDOM: u8 = 0x02;

/// A parsed `traceparent`: the context a child span is created under.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The span that is the parent of whatever span receives this header.
    pub span_id: SpanId,
    pub flags: u8,
}

impl TraceParent {
    /// A new root context: fresh trace id, fresh span id, sampled and random.
    pub fn new_root() -> Self {
        Self {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            flags: FLAG_SAMPLED | FLAG_RANDOM,
        }
    }

    /// The context of a child span of this one: same trace, new span id, same flags.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: SpanId::random(),
            flags: self.flags,
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// Parses a header value per W3C Trace Context Level 2, including the rules for
    /// versions above 00 (take the first four fields, re-emit as 00).
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let s = value.trim_matches(|c| c == ' ' || c == '\t');
        if s.len() < 55 {
            return Err(TraceParentError::TooShort);
        }
        if !s.is_ascii() {
            return Err(TraceParentError::BadDelimiter);
        }
        let version = parse_hex::<1>(&s[0..2]).ok_or(TraceParentError::BadVersion)?[0];
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        if version == 0 && s.len() != 55 {
            return Err(TraceParentError::BadLength);
        }
        if version > 0 && s.len() > 55 && s.as_bytes()[55] != b'-' {
            return Err(TraceParentError::BadDelimiter);
        }
        let bytes = s.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceParentError::BadDelimiter);
        }
        let trace_id = TraceId::from_hex(&s[3..35])?;
        let span_id = SpanId::from_hex(&s[36..52])?;
        let flags = parse_hex::<1>(&s[53..55]).ok_or(TraceParentError::BadFlags)?[0];
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The header value, always version 00.
    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id.to_hex(),
            self.span_id.to_hex(),
            self.flags
        )
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_header())
    }
}

/// Validates a `tracestate` value; returns it normalised (empty members dropped) or `None`
/// when it breaks the W3C grammar, in which case it must not be propagated.
pub fn parse_tracestate(value: &str) -> Option<String> {
    let mut members = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for raw in value.split(',') {
        let member = raw.trim_matches(|c| c == ' ' || c == '\t');
        if member.is_empty() {
            continue;
        }
        let (key, val) = member.split_once('=')?;
        if !valid_tracestate_key(key) || !valid_tracestate_value(val) || !seen.insert(key) {
            return None;
        }
        members.push(member);
    }
    if members.len() > 32 {
        return None;
    }
    Some(members.join(","))
}

fn valid_tracestate_key(key: &str) -> bool {
    let b = key.as_bytes();
    if b.is_empty() || b.len() > 256 {
        return false;
    }
    let first_ok = b[0].is_ascii_lowercase() || b[0].is_ascii_digit();
    first_ok
        && b.iter().all(|&c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
        })
}

fn valid_tracestate_value(val: &str) -> bool {
    let b = val.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b[b.len() - 1] != b' '
}

/// W3C Baggage: key/value attribution that rides with the trace (team, feature, user_tier,
/// prompt_variant …). Keys are kept in order; properties after `;` are not kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    entries: BTreeMap<String, String>,
}

/// Limits from the W3C Baggage spec: what a platform must at least propagate.
const BAGGAGE_MAX_MEMBERS: usize = 64;
const BAGGAGE_MAX_BYTES: usize = 8192;

impl Baggage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a `baggage` header. Members that break the grammar are skipped, not fatal:
    /// one bad entry from one hop must not erase everybody's attribution.
    pub fn parse(value: &str) -> Self {
        let mut entries = BTreeMap::new();
        for member in value.split(',') {
            if entries.len() >= BAGGAGE_MAX_MEMBERS {
                break;
            }
            let kv = member.split(';').next().unwrap_or_default();
            let Some((key, val)) = kv.split_once('=') else {
                continue;
            };
            let key = key.trim_matches(|c| c == ' ' || c == '\t');
            let val = val.trim_matches(|c| c == ' ' || c == '\t');
            if !is_token(key) {
                continue;
            }
            if let Some(decoded) = percent_decode(val) {
                entries.insert(key.to_string(), decoded);
            }
        }
        Self { entries }
    }

    /// Sets an entry; refuses keys that are not HTTP tokens.
    pub fn insert(&mut self, key: &str, value: &str) -> bool {
        if !is_token(key) || self.entries.len() >= BAGGAGE_MAX_MEMBERS {
            return false;
        }
        self.entries.insert(key.to_string(), value.to_string());
        true
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The header value; members that would push it past 8192 bytes are left out.
    pub fn to_header(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.entries {
            let member = format!("{k}={}", percent_encode(v));
            if out.len() + member.len() + 1 > BAGGAGE_MAX_BYTES {
                break;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&member);
        }
        out
    }
}

impl FromIterator<(String, String)> for Baggage {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(iter: T) -> Self {
        let mut b = Baggage::new();
        for (k, v) in iter {
            b.insert(&k, &v);
        }
        b
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// baggage-octet: printable ASCII except space, `"`, `,`, `;`, `\` — and `%`, which we
/// always encode so decoding is unambiguous.
fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        let plain = (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b',' | b';' | b'\\' | b'%');
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).and_then(|c| (*c as char).to_digit(16))?;
            let lo = b.get(i + 2).and_then(|c| (*c as char).to_digit(16))?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Lowercase hex only, as W3C requires (HEXDIGLC).
fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_round_trips_the_spec_example() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id.to_hex(), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.to_header(), GOOD);
    }

    #[test]
    fn refuses_each_kind_of_bad_traceparent() {
        let cases = [
            ("", TraceParentError::TooShort),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::ForbiddenVersion,
            ),
            (
                "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::BadVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParentError::ZeroSpanId,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParentError::BadTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                TraceParentError::BadTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9zzzz-01",
                TraceParentError::BadSpanId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                TraceParentError::BadFlags,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::BadDelimiter,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
                TraceParentError::BadLength,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(TraceParent::parse(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn accepts_a_higher_version_with_extra_fields_and_re_emits_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let tp = TraceParent::parse(v).unwrap();
        assert_eq!(tp.to_header(), GOOD);
        let bad = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(bad), Err(TraceParentError::BadDelimiter));
    }

    #[test]
    fn child_keeps_trace_and_changes_span() {
        let tp = TraceParent::parse(GOOD).unwrap();
        let c = tp.child();
        assert_eq!(c.trace_id, tp.trace_id);
        assert_ne!(c.span_id, tp.span_id);
    }

    #[test]
    fn tracestate_validation() {
        assert_eq!(
            parse_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7").as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(parse_tracestate("a=1,,b=2").as_deref(), Some("a=1,b=2"));
        assert_eq!(parse_tracestate("Upper=1"), None);
        assert_eq!(parse_tracestate("a=1,a=2"), None);
        assert_eq!(parse_tracestate("a=b=c"), None);
    }

    #[test]
    fn baggage_round_trip_with_encoding_and_bad_members() {
        let b = Baggage::parse(
            "team=payments, feature=check%20out;prop=1, bad key=x, user_tier=gold,=x",
        );
        assert_eq!(b.get("team"), Some("payments"));
        assert_eq!(b.get("feature"), Some("check out"));
        assert_eq!(b.get("user_tier"), Some("gold"));
        assert_eq!(b.len(), 3);
        let again = Baggage::parse(&b.to_header());
        assert_eq!(again, b);
        let mut odd = Baggage::new();
        assert!(odd.insert("prompt_variant", "a,b;c=d %e \"é\""));
        assert_eq!(Baggage::parse(&odd.to_header()), odd);
    }
}
