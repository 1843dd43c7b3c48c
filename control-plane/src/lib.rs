//! Warren's control plane.
//!
//! - [`decide`]: the pure decisions (routing, waking, idle stops, restarts with backoff,
//!   admission caps with a fair queue, mention limits) and the state they read.
//! - [`cli`]: `migrate`, `status`, `events`, `explain`.
//!
//! Still to come (issue 4): the decision loop that records decisions under a leader lease,
//! the SQL projections and `rebuild`, the reconciler and the local backend.

pub mod cli;
pub mod decide;
mod operator;
pub mod telemetry;

pub use cli::{Cli, run};
