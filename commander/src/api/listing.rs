//! One page of a listing the fleet's replicas answer together (`GET /v1/tasks?state=…`:
//! the waiting tasks in `policy.rs`, the finished ones in `finished.rs`): each replica's
//! page merged by the keys every replica's entries share.

/// Entries by key (their place in the listing's order), as the listing shows them.
pub(crate) type Keyed = Vec<(Vec<u8>, serde_json::Value)>;

/// Which way a listing runs through its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// Release or turn order (the waiting tasks).
    Ascending,
    /// Newest first (the finished tasks).
    Descending,
}

/// Each replica's page (its entries in `order`, and the key it examined up to when it may
/// have more past it) merged into the first `limit` in `order`, and the key the next page
/// starts after. Nothing past the first point where some replica may have more is shown,
/// so the next page misses none of that replica's. A task on two replicas (on its way
/// between them) is listed once, at its first place.
pub(super) fn merge(
    pages: Vec<(Keyed, Option<Vec<u8>>)>,
    limit: usize,
    order: Order,
) -> (Vec<serde_json::Value>, Option<Vec<u8>>) {
    let reached = pages.iter().filter_map(|(_, reached)| reached.clone());
    let horizon = match order {
        Order::Ascending => reached.min(),
        Order::Descending => reached.max(),
    };
    let within = |k: &Vec<u8>| {
        horizon.as_ref().is_none_or(|h| match order {
            Order::Ascending => k <= h,
            Order::Descending => k >= h,
        })
    };
    let mut entries: Vec<_> = pages
        .into_iter()
        .flat_map(|(entries, _)| entries)
        .filter(|(k, _)| within(k))
        .collect();
    entries.sort_by(|a, b| match order {
        Order::Ascending => a.0.cmp(&b.0),
        Order::Descending => b.0.cmp(&a.0),
    });
    let mut seen = std::collections::HashSet::new();
    entries.retain(|(_, t)| seen.insert(t["task_id"].as_str().unwrap_or_default().to_string()));
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|(k, _)| k.clone())
    } else {
        horizon
    };
    (entries.into_iter().map(|(_, t)| t).collect(), next)
}
