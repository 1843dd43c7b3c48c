//! Rebuilding the decision state from the log: the one place it is read for that.

use warren_schema::EventLog;
use warren_schema::event_log::projection::load_checkpoint;

use crate::decide::State;
use crate::error::Result;

/// The state after every committed event up to the checkpoint `name` (0 when it has none),
/// and that checkpoint.
pub async fn to_checkpoint(log: &EventLog, name: &str) -> Result<(State, i64)> {
    let checkpoint = load_checkpoint(log.pool(), name).await?;
    let mut state = State::default();
    loop {
        let page = log
            .read_positions(state.position, checkpoint, 10_000)
            .await?;
        if page.is_empty() {
            return Ok((state, checkpoint));
        }
        for event in &page {
            state.apply(event);
        }
    }
}
