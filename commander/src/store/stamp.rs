//! When a task's state changed: [`Stamp`].
//!
//! The commander stamps its own changes in unix milliseconds and shows them (API, JSON) as
//! RFC 3339 with milliseconds and `Z`, the text it always wrote. Kept as a number, a stamp
//! is never parsed or formatted on the task path: format 4 stores the number as it is
//! (`codec`), and the result's dispatch latency subtracts it. A time an older record holds
//! in any other form (another precision, an offset, a leap second, not a time at all) is
//! kept as its text, exactly.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The first unix second of the year 10000, which RFC 3339 cannot write.
pub(super) const YEAR_10000_S: u64 = 253_402_300_800;

/// A state change's time (see the module's docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp(Repr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    /// Always before the year 10000 ([`Stamp::from_unix_ms`] checks), so it can be shown.
    UnixMs(u64),
    Text(String),
}

impl Stamp {
    /// Now, by the wall clock (a clock before 1970 reads as 1970, one past the year 9999
    /// as its last millisecond).
    pub fn now() -> Self {
        let ms = crate::domain::Clock::now_ms(&crate::domain::SystemClock);
        Self(Repr::UnixMs(ms.min(YEAR_10000_S * 1000 - 1)))
    }

    /// `ms` after 1970; `None` from the year 10000 on, which RFC 3339 cannot show.
    pub fn from_unix_ms(ms: u64) -> Option<Self> {
        (ms / 1000 < YEAR_10000_S).then_some(Self(Repr::UnixMs(ms)))
    }

    /// The time `text` says: a number when it is exactly what a stamp shows, else the
    /// text as it is.
    pub fn from_text(text: &str) -> Self {
        match unix_ms_of(text) {
            Some(ms) => Self(Repr::UnixMs(ms)),
            None => Self(Repr::Text(text.to_string())),
        }
    }

    /// The number, when the stamp is one (what [`Stamp::now`] and [`Stamp::from_unix_ms`]
    /// make); `None` for a time kept as text.
    pub fn as_unix_ms(&self) -> Option<u64> {
        match &self.0 {
            Repr::UnixMs(ms) => Some(*ms),
            Repr::Text(_) => None,
        }
    }

    /// The text, for a time kept as text.
    pub fn as_text(&self) -> Option<&str> {
        match &self.0 {
            Repr::UnixMs(_) => None,
            Repr::Text(t) => Some(t),
        }
    }

    /// Unix milliseconds, also for a time kept as text when it reads as an RFC 3339
    /// timestamp ([`fleet_worker::message::parse_rfc3339`]); `None` for text that does
    /// not.
    pub fn unix_ms(&self) -> Option<u64> {
        match &self.0 {
            Repr::UnixMs(ms) => Some(*ms),
            Repr::Text(t) => fleet_worker::message::rfc3339_unix_ms(t),
        }
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::UnixMs(ms) => match rfc3339_ms(*ms) {
                Some(t) => t.fmt(f),
                // Not reached: `from_unix_ms` keeps out what cannot be shown.
                None => write!(f, "{ms}"),
            },
            Repr::Text(t) => f.write_str(t),
        }
    }
}

/// As its text, in JSON and in formats 1 to 3 of the task record alike.
impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Stamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Borrowed where the format allows (postcard, JSON without escapes), owned else.
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Self::from_text(&text))
    }
}

/// The unix milliseconds `s` stands for, when it is exactly what [`rfc3339_ms`] writes
/// for them (a leap second, other precisions or an offset are not).
fn unix_ms_of(s: &str) -> Option<u64> {
    // `2026-12-05T12:15:36.620Z`: the only length `format_rfc3339_millis` writes.
    if s.len() != 24 {
        return None;
    }
    let since = humantime::parse_rfc3339(s)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?;
    let ms = u64::try_from(since.as_millis()).ok()?;
    let mut again = TimeText::default();
    std::fmt::Write::write_fmt(&mut again, format_args!("{}", rfc3339_ms(ms)?)).ok()?;
    (again.as_bytes() == s.as_bytes()).then_some(ms)
}

/// `ms` after 1970 as RFC 3339 in milliseconds; `None` past the year 9999, which
/// `humantime` refuses to write.
fn rfc3339_ms(ms: u64) -> Option<humantime::Rfc3339Timestamp> {
    if ms / 1000 >= YEAR_10000_S {
        return None;
    }
    Some(humantime::format_rfc3339_millis(
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))?,
    ))
}

/// A timestamp written on the stack, to compare without allocating.
#[derive(Default)]
struct TimeText {
    bytes: [u8; 32],
    len: usize,
}

impl TimeText {
    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Write for TimeText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(std::fmt::Error)?;
        self.bytes
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commanders_own_text_becomes_a_number_and_shows_as_it_was() {
        let s = Stamp::from_text("2026-12-05T12:15:36.620Z");
        assert_eq!(s.as_unix_ms(), Some(1_796_472_936_620));
        assert_eq!(s.to_string(), "2026-12-05T12:15:36.620Z");
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#""2026-12-05T12:15:36.620Z""#
        );
        let now = Stamp::now();
        assert_eq!(Stamp::from_text(&now.to_string()), now);
        let sdk = fleet_worker::message::now_rfc3339();
        assert!(Stamp::from_text(&sdk).as_unix_ms().is_some(), "{sdk}");
    }

    #[test]
    fn any_other_text_is_kept_exactly() {
        for t in [
            "2026-12-05T12:15:36Z",
            "2026-12-05T12:15:36.620123Z",
            "2026-12-05T13:15:36.620+01:00",
            "2016-12-31T23:59:60.000Z",
            "yesterday",
            "",
            "2026-12-05T12:15:36.62éZ",
        ] {
            let s = Stamp::from_text(t);
            assert_eq!(s.as_text(), Some(t), "{t}");
            assert_eq!(s.to_string(), t);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Stamp>(&json).unwrap(), s);
            let pc = postcard::to_allocvec(&s).unwrap();
            assert_eq!(postcard::from_bytes::<Stamp>(&pc).unwrap(), s);
        }
        // A time kept as text still has a number when it reads as one.
        for t in [
            "2026-12-05T12:15:36.620123Z",
            "2026-12-05T13:15:36.620+01:00",
        ] {
            assert_eq!(
                Stamp::from_text(t).unix_ms(),
                Some(1_796_472_936_620),
                "{t}"
            );
        }
        assert_eq!(Stamp::from_text("yesterday").unix_ms(), None);
    }

    #[test]
    fn a_number_past_the_year_9999_is_refused() {
        assert!(Stamp::from_unix_ms(YEAR_10000_S * 1000 - 1).is_some());
        for ms in [YEAR_10000_S * 1000, u64::MAX] {
            assert_eq!(Stamp::from_unix_ms(ms), None);
        }
    }
}
