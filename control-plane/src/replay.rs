//! Rebuilding the decision state from the log, and folding a stretch of the log into any
//! state with the reading and the folding overlapped ([`fold_range`]).

use warren_schema::EventLog;
use warren_schema::event_log::projection::load_checkpoint;

use crate::decide::State;
use crate::error::Result;

/// The state after every committed event up to the checkpoint `name` (0 when it has none),
/// and that checkpoint. Read and folded overlapped ([`fold_range`]).
pub async fn to_checkpoint(log: &EventLog, name: &str) -> Result<(State, i64)> {
    let checkpoint = load_checkpoint(log.pool(), name).await?;
    let state = fold_range(log, State::default(), 0, checkpoint, |state, event| {
        state.apply(event);
    })
    .await?;
    Ok((state, checkpoint))
}

/// Folds the events of `(after, up_to]` into `state` with `step`, in log order. Two reader
/// tasks, each on its own connection, read alternate stretches of positions ahead of the
/// fold while `step` runs on a blocking thread: reading (the larger cost: the database
/// sends, this process parses JSON) runs on both cores, and the CPU work of a long replay
/// never holds an async worker. Positions past the log's head are not waited for. A failed
/// read fails the whole fold (no partial state is returned).
pub async fn fold_range<S: Send + 'static>(
    log: &EventLog,
    state: S,
    after: i64,
    up_to: i64,
    step: fn(&mut S, &warren_schema::RecordedEvent),
) -> warren_schema::Result<S> {
    /// Positions per read: a stretch holds at most this many events.
    const STRETCH: i64 = 10_000;
    const READERS: i64 = 2;
    let up_to = up_to.min(log.head().await?);
    let mut pages = Vec::new();
    let mut readers = Vec::new();
    for reader in 0..READERS {
        let (send, received) = tokio::sync::mpsc::channel::<Vec<warren_schema::RecordedEvent>>(2);
        pages.push(received);
        let log = log.clone();
        readers.push(tokio::spawn(async move {
            // Stretch k covers (after + k * STRETCH, after + (k + 1) * STRETCH]; this reader
            // reads every READERS-th one.
            let mut from = after.saturating_add(reader * STRETCH);
            while from < up_to {
                let to = from.saturating_add(STRETCH).min(up_to);
                let events = log.read_positions(from, to, STRETCH).await?;
                if send.send(events).await.is_err() {
                    break;
                }
                from = from.saturating_add(READERS * STRETCH);
            }
            Ok::<(), warren_schema::Error>(())
        }));
    }
    let mut state = state;
    let state = tokio::task::spawn_blocking(move || {
        // Stretches in order, taking turns between the readers. The first reader to run
        // out (past the end, or failed) ends the fold; a failure is reported below.
        let readers = pages.len();
        for turn in 0.. {
            let Some(events) = pages[turn % readers].blocking_recv() else {
                break;
            };
            for event in &events {
                step(&mut state, event);
            }
        }
        state
    })
    .await
    .map_err(|e| warren_schema::Error::InvalidEvent(format!("the fold stopped: {e}")))?;
    for reader in readers {
        reader
            .await
            .map_err(|e| warren_schema::Error::InvalidEvent(format!("a reader stopped: {e}")))??;
    }
    Ok(state)
}
