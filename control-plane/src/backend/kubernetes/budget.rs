//! The API budget: how hard the control plane may push the API server.
//!
//! - **Concurrency:** at most `concurrency` calls in flight.
//! - **Write rate:** writes (apply, delete) start at most `writes_per_second` apart on
//!   average, with a burst of a second's worth (a token bucket).
//! - **Retries:** 429 and 5xx answers, and connection failures, are retried after the
//!   server's `retryAfterSeconds` when it gives one, else after an exponential backoff
//!   (100 ms doubling to 10 s, with jitter), up to [`MAX_ATTEMPTS`]. Every retry is logged
//!   with its reason and counted (`warren_kubernetes_retries_total{reason}`).

use std::future::Future;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tracing::{Instrument, warn};

/// Attempts of one call before its error is returned.
pub const MAX_ATTEMPTS: u32 = 8;

/// Limits on the calls the backend makes.
#[derive(Debug)]
pub struct Budget {
    calls: Semaphore,
    bucket: Mutex<Bucket>,
    writes_per_second: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Whether a failed call is worth repeating, and after how long at least.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    /// Not a transient error: give up now.
    Never,
    /// Transient; the server asked for this pause (429 with `retryAfterSeconds`).
    After(Duration, &'static str),
    /// Transient; back off.
    Backoff(&'static str),
}

/// How a kube error is retried (pure).
pub fn classify(error: &kube::Error) -> Retry {
    match error {
        kube::Error::Api(status) => {
            let after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            match (status.code, after) {
                (429, Some(after)) => Retry::After(after, "429 too many requests"),
                (429, None) => Retry::Backoff("429 too many requests"),
                (500..=599, Some(after)) => Retry::After(after, "5xx server error"),
                (500..=599, None) => Retry::Backoff("5xx server error"),
                _ => Retry::Never,
            }
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => Retry::Backoff("connection"),
        _ => Retry::Never,
    }
}

/// The pause before attempt `attempt` (1-based) after a failure: 100 ms doubling, at most
/// 10 s, less up to a quarter at random so that retries of many calls spread out.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(10));
    let jitter = rand::random::<f64>() * 0.25;
    base.mul_f64(1.0 - jitter)
}

impl Budget {
    pub fn new(concurrency: usize, writes_per_second: f64) -> Self {
        let writes_per_second = writes_per_second.max(0.1);
        Self {
            calls: Semaphore::new(concurrency.max(1)),
            bucket: Mutex::new(Bucket {
                tokens: writes_per_second.max(1.0),
                at: Instant::now(),
            }),
            writes_per_second,
        }
    }

    /// Waits for a write token.
    async fn write_token(&self) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().await;
                let now = Instant::now();
                let burst = self.writes_per_second.max(1.0);
                bucket.tokens = (bucket.tokens
                    + now.duration_since(bucket.at).as_secs_f64() * self.writes_per_second)
                    .min(burst);
                bucket.at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / self.writes_per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Runs `call` within the budget (a write when `write`), retrying transient errors.
    /// `what` names the call in logs.
    pub async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        write: bool,
        mut call: F,
    ) -> kube::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        // A span per call (in the trace of whatever caused it: a start decision's message),
        // recording how many attempts it took and why it was retried.
        let span = tracing::info_span!(
            "kubernetes.api",
            call = what,
            write,
            attempts = tracing::field::Empty,
            retried_for = tracing::field::Empty,
        );
        self.attempts(what, write, &mut call).instrument(span).await
    }

    async fn attempts<T, F, Fut>(&self, what: &str, write: bool, call: &mut F) -> kube::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        let mut attempt = 1;
        loop {
            tracing::Span::current().record("attempts", attempt);
            let result = {
                // The semaphore is never closed.
                let _permit = self.calls.acquire().await.ok();
                if write {
                    self.write_token().await;
                }
                // The API server's time only: waiting for a permit or a write token is the
                // budget's, not the server's.
                let started = std::time::Instant::now();
                let result = call().await;
                metrics::histogram!("warren_kubernetes_api_seconds", "call" => what.to_owned())
                    .record(started.elapsed().as_secs_f64());
                result
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let (pause, reason) = match classify(&error) {
                Retry::Never => return Err(error),
                _ if attempt >= MAX_ATTEMPTS => return Err(error),
                Retry::After(after, reason) => (after, reason),
                Retry::Backoff(reason) => (backoff(attempt), reason),
            };
            metrics::counter!("warren_kubernetes_retries_total", "reason" => reason).increment(1);
            tracing::Span::current().record("retried_for", reason);
            warn!(call = what, attempt, reason, pause_ms = pause.as_millis() as u64,
                  error = %error, "Kubernetes API call failed; retrying");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: u32) -> kube::Error {
        let mut s = kube::core::Status::failure("slow down", "TooManyRequests").with_code(code);
        s.details =
            serde_json::from_value(serde_json::json!({"retryAfterSeconds": retry_after})).ok();
        kube::Error::Api(s.boxed())
    }

    #[test]
    fn transient_errors_are_retried_and_the_server_pause_is_honoured() {
        assert_eq!(
            classify(&status(429, 3)),
            Retry::After(Duration::from_secs(3), "429 too many requests")
        );
        assert_eq!(
            classify(&status(429, 0)),
            Retry::Backoff("429 too many requests")
        );
        assert_eq!(
            classify(&status(503, 0)),
            Retry::Backoff("5xx server error")
        );
        assert_eq!(classify(&status(422, 0)), Retry::Never);
        assert_eq!(classify(&status(404, 0)), Retry::Never);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(1) >= Duration::from_millis(75));
        assert!(backoff(4) >= Duration::from_millis(600));
        assert!(backoff(30) <= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_keep_to_the_rate_after_the_burst() {
        let budget = Budget::new(4, 10.0);
        let start = Instant::now();
        for _ in 0..30 {
            budget.write_token().await;
        }
        // 10 from the burst, then 20 at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_is_retried_until_it_succeeds() {
        let budget = Budget::new(1, 100.0);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let result = budget
            .call("test", true, || async {
                match attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 => Err(status(429, 2)),
                    1 => Err(status(500, 0)),
                    _ => Ok("done"),
                }
            })
            .await;
        assert_eq!(result.ok(), Some("done"));
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
        let gave_up = budget
            .call("test", false, || async { Err::<(), _>(status(403, 0)) })
            .await;
        assert!(gave_up.is_err());
    }
}
