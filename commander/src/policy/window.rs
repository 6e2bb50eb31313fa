//! Budget windows (calendar hour, day and month in UTC, or rolling) and how amounts and
//! times are written. Below both the policy loader (which parses windows) and the budget
//! ledger (which buckets spending by them), so neither imports the other.

pub(crate) const HOUR_MS: u64 = 3_600_000;
pub(crate) const DAY_MS: u64 = 24 * HOUR_MS;
/// Sub-buckets of a rolling window: spending leaves the window in 1/60th steps.
const ROLLING_BUCKETS: u64 = 60;

/// A budget window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    /// Calendar hour, day or month in UTC: everything resets at the boundary.
    Hour,
    Day,
    Month,
    /// The last `n` milliseconds, in 60 buckets.
    Rolling(u64),
}

impl Window {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "hour" | "hourly" => Ok(Window::Hour),
            "day" | "daily" => Ok(Window::Day),
            "month" | "monthly" => Ok(Window::Month),
            other => {
                let d = humantime::parse_duration(other).map_err(|_| {
                    format!(
                        "window {other:?} must be hour, day, month or a duration such as 30m, 6h, 7d"
                    )
                })?;
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                if ms < 60_000 {
                    return Err(format!("window {other:?} must be at least 1m"));
                }
                if ms > 366 * DAY_MS {
                    return Err(format!("window {other:?} must be at most 366d"));
                }
                Ok(Window::Rolling(ms))
            }
        }
    }

    /// The start of the ledger bucket `now_ms` falls in.
    pub fn bucket(&self, now_ms: u64) -> u64 {
        match self {
            Window::Hour => now_ms - now_ms % HOUR_MS,
            Window::Day => now_ms - now_ms % DAY_MS,
            Window::Month => month_start(now_ms),
            Window::Rolling(d) => {
                let step = (d / ROLLING_BUCKETS).max(1);
                now_ms - now_ms % step
            }
        }
    }

    /// Buckets starting at or after this count toward the window at `now_ms`.
    pub fn counting_from(&self, now_ms: u64) -> u64 {
        match self {
            Window::Rolling(d) => {
                let step = (d / ROLLING_BUCKETS).max(1);
                // The bucket holding `now - d` has partly left the window; it leaves whole.
                self.bucket(now_ms.saturating_sub(*d)) + step
            }
            _ => self.bucket(now_ms),
        }
    }

    /// When a bucket starting at `bucket` stops counting.
    pub fn bucket_expires(&self, bucket: u64) -> u64 {
        match self {
            Window::Hour => bucket + HOUR_MS,
            Window::Day => bucket + DAY_MS,
            Window::Month => month_start(bucket + 32 * DAY_MS),
            Window::Rolling(d) => bucket + d,
        }
    }
}

/// 00:00 UTC on the first of the month of `ms`.
fn month_start(ms: u64) -> u64 {
    let days = (ms / DAY_MS) as i64;
    let (y, m, _) = civil_from_days(days);
    (days_from_civil(y, m, 1) as u64) * DAY_MS
}

// Howard Hinnant's civil-date algorithms (public domain), for UTC calendar windows
// without a date-time dependency.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 text of a unix time in ms.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// A configured amount of USD as it was written: at least cents (`25.00`, `12.50`), and
/// every digit it was given beyond them (`0.0025` stays `0.0025`, not `0.00`).
pub fn usd(v: f64) -> String {
    let shortest = format!("{v}");
    let decimals = shortest.split_once('.').map(|(_, d)| d.len()).unwrap_or(0);
    if decimals >= 2 || shortest.contains(['e', 'E']) || !v.is_finite() {
        shortest
    } else {
        format!("{v:.2}")
    }
}
