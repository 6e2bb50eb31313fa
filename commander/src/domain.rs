//! The ground floor: plain values every layer may use and that import nothing of the
//! commander's own. Keep it free of I/O and of the layers above (the tidy test checks).

use serde::{Deserialize, Serialize};

/// The versions of the reloadable sources a decision was made under, checked together
/// (`sources.rs`): the policy version, and the rubric's and the registry's generations
/// (1 at start, +1 per accepted edit; `GET /v1/classifier` and `GET /v1/models` show the
/// ones in force).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub policy: String,
    pub rubric: u64,
    pub registry: u64,
}
