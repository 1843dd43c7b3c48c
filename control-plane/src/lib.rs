//! Warren's control plane.
//!
//! Today it owns the database schema (`migrate`) and the operator's view of the event log
//! (`status`, `events`, `explain`). Projections, decisions and reconciliation arrive with
//! the control-plane issue; see `docs/architecture.md` for where each will live.

pub mod cli;
mod operator;
pub mod telemetry;

pub use cli::{Cli, run};
