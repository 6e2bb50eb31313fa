//! Budget soft-threshold notices (`budget_soft_threshold` on `<prefix>.alerts.warning`,
//! docs/policy.md), sent once for the fleet per budget value, window bucket and threshold.
//!
//! Each replica decides its own share of the tasks, so each may be the one to see a
//! threshold crossed, and each remembers only what it sent itself (until it restarts).
//! So a notice carries an `id` made of what it is about, and goes out only from the
//! replica that creates that key in the `<prefix>_notices` key-value bucket: the others,
//! and this replica after a restart, find the key there and stay quiet. Keys leave the
//! bucket after [`MAX_AGE`], longer than a calendar month's window. When NATS cannot say
//! (it is away, or slow), the notice goes out anyway: twice beats never.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::Ctx;

/// How long a notice's key is kept: past the longest window bucket (a calendar month).
pub const MAX_AGE: Duration = Duration::from_secs(32 * 24 * 3600);

/// The bucket's name for a subject prefix.
pub fn bucket_name(prefix: &str) -> String {
    format!("{}_notices", prefix.replace('.', "_"))
}

/// A notice's id: its budget, value, window bucket (start, unix ms) and threshold, hashed
/// (a value may hold any character, a key only a few).
pub fn id(budget: &str, value: &str, bucket_ms: u64, at: f64) -> String {
    let permille = (at * 1000.0).round() as u32;
    let h = crate::domain::fnv1a(&[
        budget.as_bytes(),
        value.as_bytes(),
        &bucket_ms.to_be_bytes(),
        &permille.to_be_bytes(),
    ]);
    format!("soft.{h:016x}")
}

/// Sends `notice` on `<prefix>.alerts.warning` unless another replica (or this one, before
/// a restart) sent one with its `id`. Off the task path: it waits for NATS.
pub fn send_once(ctx: &Ctx, notice: serde_json::Value) {
    let client = ctx.client.clone();
    let subject = ctx.subjects.alerts("warning");
    let bucket = ctx.notices.clone();
    let replica = ctx.core.replica.clone();
    tokio::spawn(async move {
        let id = notice["id"].as_str().unwrap_or_default();
        match bucket.create(id, Bytes::from(replica.to_string())).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                tracing::debug!(
                    id,
                    "budget notice already sent, by another replica or before a restart"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, id, "cannot tell whether this budget notice was sent; sending it")
            }
        }
        if let Err(e) = client
            .publish(subject, Bytes::from(notice.to_string()))
            .await
        {
            tracing::warn!(error = %e, id, "budget notice not published");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_id_names_its_budget_value_bucket_and_threshold() {
        let a = id("team-day", "payments", 1_796_169_600_000, 0.8);
        assert_eq!(a, id("team-day", "payments", 1_796_169_600_000, 0.8));
        assert!(a.starts_with("soft.") && a.len() == 21, "{a}");
        for other in [
            id("team-day", "search", 1_796_169_600_000, 0.8),
            id("team-day", "payments", 1_796_256_000_000, 0.8),
            id("team-day", "payments", 1_796_169_600_000, 0.9),
            id("team-da", "ypayments", 1_796_169_600_000, 0.8),
        ] {
            assert_ne!(a, other);
        }
    }
}
