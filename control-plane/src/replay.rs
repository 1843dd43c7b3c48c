//! Rebuilding the decision state from the log, and folding a stretch of the log into any
//! state with the reading and the folding overlapped ([`fold_range`]).

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

/// Folds the events of `(after, up_to]` into `state` with `step`, in log order. A task reads
/// the next pages while `step` runs on a blocking thread: the two overlap, and the CPU work
/// of a long replay never holds an async worker. A failed read fails the whole fold (no
/// partial state is returned).
pub async fn fold_range<S: Send + 'static>(
    log: &EventLog,
    state: S,
    after: i64,
    up_to: i64,
    step: fn(&mut S, &warren_schema::RecordedEvent),
) -> warren_schema::Result<S> {
    const PAGE: i64 = 10_000;
    let (pages, mut received) = tokio::sync::mpsc::channel::<Vec<warren_schema::RecordedEvent>>(2);
    let log = log.clone();
    let reader = tokio::spawn(async move {
        let mut after = after;
        loop {
            let events = log.read_positions(after, up_to, PAGE).await?;
            let next = match events.last() {
                Some(last) if events.len() as i64 == PAGE => Some(last.position),
                _ => None,
            };
            if pages.send(events).await.is_err() {
                return Ok(());
            }
            match next {
                Some(position) => after = position,
                None => return Ok::<(), warren_schema::Error>(()),
            }
        }
    });
    let mut state = state;
    let state = tokio::task::spawn_blocking(move || {
        while let Some(events) = received.blocking_recv() {
            for event in &events {
                step(&mut state, event);
            }
        }
        state
    })
    .await
    .map_err(|e| warren_schema::Error::InvalidEvent(format!("the fold stopped: {e}")))?;
    reader
        .await
        .map_err(|e| warren_schema::Error::InvalidEvent(format!("the reader stopped: {e}")))??;
    Ok(state)
}
