//! Warren's shared core: the event log and the event types every service speaks.
//!
//! - [`event_log`]: migrations, append (with group commit), gap-free subscription, exactly-once
//!   projection, operator reads.
//! - [`envelope`]: what every event carries (id, metadata).
//! - [`events`]: the versioned payload types.

pub mod envelope;
mod error;
pub mod event_log;
pub mod events;
pub mod launch;
pub mod lease;
pub mod nats;
pub mod secret;
#[cfg(feature = "testing")]
pub mod testing;

pub use envelope::{EventId, Metadata, NewEvent, RecordedEvent};
pub use error::{Error, Result};
pub use event_log::{AppendRequest, Appended, EventLog, ExpectedVersion};
pub use secret::Secret;
