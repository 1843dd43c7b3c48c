//! Group commit: many callers' appends share one transaction, and each caller hears back
//! only after that transaction has committed.
//!
//! Callers put their request on a bounded queue and await a reply. A few writer tasks each
//! take a batch off the queue (whatever is waiting, up to `max_batch_events`, lingering at
//! most `max_wait` for more) and commit it in one transaction. While one writer waits for
//! its commit to flush, the next batch accumulates, so the cost of each flush is shared.
//!
//! Failure rules:
//! - A request refused on its own merits (wrong expected version) is answered alone; the
//!   rest of its batch commits.
//! - If the batch's transaction fails because of the data (a statement error), each request
//!   is retried in a transaction of its own, so one bad request cannot fail its neighbours.
//! - If it fails because the database is unreachable, or the commit's outcome is unknown,
//!   every caller in the batch gets the error. None is told "stored" unless the commit
//!   returned success; a caller told "failed" may find its event stored after all, which
//!   its retry (same event id) absorbs as a duplicate.
//! - A full queue is refused at once ([`Error::Overloaded`]) so a gateway can answer 503
//!   well inside a sender's timeout instead of queueing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span, warn};

use super::{AppendRequest, Appended, append};
use crate::{Error, Result};

/// Tuning of the group-commit appender.
#[derive(Debug, Clone)]
pub struct AppenderConfig {
    /// Most events in one transaction.
    pub max_batch_events: usize,
    /// Longest a writer lingers for more requests once it has one. Zero takes only what is
    /// already queued: lowest latency, and batches still grow under load.
    pub max_wait: Duration,
    /// Requests that may wait; beyond this, appends fail fast with `Overloaded`.
    pub queue_capacity: usize,
    /// Concurrent writer transactions (each holds a pool connection while it commits).
    pub writers: usize,
    /// Admission by queue wait: while requests are queued and the last batch a writer took
    /// had waited longer than this, new appends fail fast with `Overloaded` instead of
    /// joining a queue they would wait in as long. A full queue of a slow database can hold
    /// seconds of work; this keeps both the refusals and the accepted appends quick.
    /// `None`: only `queue_capacity` limits.
    pub max_queue_wait: Option<Duration>,
}

impl Default for AppenderConfig {
    fn default() -> Self {
        Self {
            max_batch_events: 500,
            max_wait: Duration::ZERO,
            queue_capacity: 10_000,
            writers: 2,
            max_queue_wait: None,
        }
    }
}

struct Job {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
    enqueued: Instant,
}

/// Handle to the group-commit appender. Cheap to clone; the writers stop once every clone
/// is dropped and the queue is drained.
#[derive(Debug, Clone)]
pub struct Appender {
    queue: mpsc::Sender<Job>,
    /// How long the oldest request of the batch a writer took last had waited, µs.
    waited: Arc<AtomicU64>,
    max_queue_wait: Option<Duration>,
}

/// The writer tasks; await [`AppenderTasks::join`] after dropping every [`Appender`] for a
/// graceful shutdown that answers every queued caller. Dropping this value does not stop
/// the writers (they run until the last `Appender` is gone); it only gives up waiting.
#[derive(Debug)]
pub struct AppenderTasks(Vec<JoinHandle<()>>);

impl AppenderTasks {
    pub async fn join(self) {
        for task in self.0 {
            if let Err(e) = task.await {
                warn!(error = %e, "event log writer task ended abnormally");
            }
        }
    }
}

impl Appender {
    /// Starts the writer tasks on the current runtime.
    pub fn start(pool: PgPool, config: AppenderConfig) -> (Self, AppenderTasks) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let waited = Arc::new(AtomicU64::new(0));
        let tasks = (0..config.writers.max(1))
            .map(|writer| {
                let (pool, rx, config) = (pool.clone(), rx.clone(), config.clone());
                let waited = waited.clone();
                tokio::spawn(
                    writer_loop(pool, rx, config, waited)
                        .instrument(info_span!("event_log_writer", writer)),
                )
            })
            .collect();
        let appender = Self {
            queue: tx,
            waited,
            max_queue_wait: config.max_queue_wait,
        };
        (appender, AppenderTasks(tasks))
    }

    /// Appends one request; resolves after the batch holding it has committed. Its span,
    /// in the caller's trace, lasts until then (the wait for a batch included).
    #[tracing::instrument(
        name = "event_log_append",
        skip_all,
        fields(stream = %request.stream, events = request.events.len())
    )]
    pub async fn append(&self, request: AppendRequest) -> Result<Vec<Appended>> {
        append::validate(&request)?;
        if self.waits_too_long() {
            metrics::counter!("warren_event_log_append_shed_total", "reason" => "queue_wait")
                .increment(1);
            return Err(Error::Overloaded);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            reply,
            enqueued: Instant::now(),
        };
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("warren_event_log_append_shed_total", "reason" => "queue_full")
                    .increment(1);
                Error::Overloaded
            }
            mpsc::error::TrySendError::Closed(_) => Error::AppenderStopped,
        })?;
        answer.await.map_err(|_| Error::AppenderStopped)?
    }

    /// Requests waiting for a writer.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Whether a new append would wait past `max_queue_wait` ([`sheds`]).
    fn waits_too_long(&self) -> bool {
        self.max_queue_wait.is_some_and(|max| {
            sheds(
                self.queued(),
                Duration::from_micros(self.waited.load(Ordering::Relaxed)),
                max,
            )
        })
    }
}

/// Admission by queue wait: shed while requests are queued and the last batch taken had
/// waited past `max`. An empty queue admits whatever the last wait was (it is stale). Pure.
pub fn sheds(queued: usize, last_wait: Duration, max: Duration) -> bool {
    queued > 0 && last_wait > max
}

async fn writer_loop(
    pool: PgPool,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    config: AppenderConfig,
    waited: Arc<AtomicU64>,
) {
    // Each writer keeps its connection between batches: taking one from the pool per batch
    // costs a health-check round trip (sqlx pings on acquire) on the hot path. A connection
    // that saw an error is dropped and a fresh one taken for the next batch.
    let mut conn: Option<PoolConnection<Postgres>> = None;
    while let Some(batch) = next_batch(&rx, &config).await {
        if let Some(oldest) = batch.first() {
            let micros = u64::try_from(oldest.enqueued.elapsed().as_micros()).unwrap_or(u64::MAX);
            waited.store(micros, Ordering::Relaxed);
        }
        if conn.is_none() {
            match pool.acquire().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    let e = Error::db("acquiring a connection to append")(e);
                    fail_batch(batch, &e);
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut()
            && !commit_jobs(c, batch).await
        {
            conn = None;
        }
    }
}

/// Takes the next batch; `None` when the queue is closed and drained.
async fn next_batch(rx: &Mutex<mpsc::Receiver<Job>>, config: &AppenderConfig) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut events = first.request.events.len();
    let mut batch = vec![first];
    let deadline = Instant::now() + config.max_wait;
    while events < config.max_batch_events {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, rx.recv()).await {
                    Ok(Some(job)) => job,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        events += job.request.events.len();
        batch.push(job);
    }
    Some(batch)
}

/// Commits one batch and answers its callers. Returns false when the connection saw an
/// error and should not be reused.
async fn commit_jobs(conn: &mut PgConnection, jobs: Vec<Job>) -> bool {
    let started = Instant::now();
    let requests: Vec<&AppendRequest> = jobs.iter().map(|j| &j.request).collect();
    let events: usize = requests.iter().map(|r| r.events.len()).sum();
    let span = info_span!("event_log_commit", requests = jobs.len(), events);
    let result = super::commit_requests(conn, &requests)
        .instrument(span)
        .await;
    drop(requests);

    match result {
        Ok(outcomes) => {
            metrics::histogram!("warren_event_log_batch_events").record(events as f64);
            metrics::histogram!("warren_event_log_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("warren_event_log_appended_events_total").increment(events as u64);
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                reply(job, outcome);
            }
            true
        }
        Err(e) if jobs.len() > 1 && !e.is_unavailable() => {
            // A statement failed because of something in the batch: isolate it.
            debug!(error = %e, "batch failed; retrying its requests one by one");
            let mut jobs = jobs.into_iter();
            while let Some(job) = jobs.next() {
                match super::commit_requests(conn, &[&job.request]).await {
                    Ok(mut outcome) => reply(job, outcome.remove(0)),
                    Err(e) if e.is_unavailable() => {
                        // The connection is gone: the rest of the batch fails with it.
                        fail_batch(std::iter::once(job).chain(jobs).collect(), &e);
                        return false;
                    }
                    Err(e) => reply(job, Err(e)),
                }
            }
            true
        }
        Err(e) => {
            fail_batch(jobs, &e);
            false
        }
    }
}

fn fail_batch(jobs: Vec<Job>, e: &Error) {
    warn!(error = %e, requests = jobs.len(), "event log batch failed");
    metrics::counter!("warren_event_log_batch_failures_total", "error" => e.metric_label())
        .increment(1);
    for job in jobs {
        reply(job, Err(e.clone()));
    }
}

fn reply(job: Job, outcome: Result<Vec<Appended>>) {
    metrics::histogram!("warren_event_log_append_seconds")
        .record(job.enqueued.elapsed().as_secs_f64());
    // A caller that went away (a cancelled request) still had its event stored; its
    // sender's retry will be answered as a duplicate.
    let _ = job.reply.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_shed_while_the_queue_makes_them_wait_too_long() {
        let max = Duration::from_millis(50);
        assert!(sheds(3, Duration::from_millis(51), max));
        assert!(!sheds(3, Duration::from_millis(50), max), "at the limit");
        assert!(!sheds(3, Duration::from_millis(2), max));
        assert!(
            !sheds(0, Duration::from_secs(3), max),
            "an empty queue: the last wait is stale"
        );
    }
}
