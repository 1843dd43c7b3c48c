//! Warren's control plane.
//!
//! - [`decide`]: the pure decisions (routing, waking, idle stops, restarts with backoff,
//!   admission caps with a fair queue, mention limits) and the state they read.
//! - [`controller`]: the leader lease and the loop that records decisions exactly once.
//! - [`config_file`]: the declarative agents-and-routes file, turned into events.
//! - [`explain`]: why a workspace runs, why a message or reply happened.
//! - [`cli`]: `run`, `migrate`, `rebuild`, `status`, `events`, `explain`, `nats-auth`.
//!
//! - [`projection`]: the read models (agents, routes, workspaces, messages, replies) and
//!   `rebuild`.
//!
//! - [`reconcile`] and [`backend`]: make the runtime match the decisions (`local`: child
//!   processes) and record what it reports.
//!
//! - [`delivery`]: routed messages to the agents' NATS inboxes, their output back into the
//!   log; [`nats_auth`]: a NATS user per workspace, allowed its own subjects only.
//!
//! Still to come: the `kubernetes` backend.

pub mod admin_api;
pub mod backend;
pub mod cli;
pub mod config_file;
pub mod controller;
pub mod decide;
pub mod delivery;
pub mod error;
pub mod explain;
pub mod nats_auth;
mod operator;
pub mod projection;
pub mod reconcile;
pub mod replay;
pub mod what_if;

pub use cli::{Cli, run};
