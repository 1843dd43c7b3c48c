//! One replica at a time, for the followers whose effects leave Warren: posting replies to
//! Slack ([`crate::replies`]) and downloading attached files with the bot token
//! ([`crate::files`]). Every gateway replica runs them, and each would repeat the other's
//! work; so each runs only while its replica holds a lease of its own (the same lease as
//! the control plane's leadership, `warren_schema::lease`). The others wait and take over
//! when it is released (a replica stopping) or expires (one that died, after
//! [`LEASE_TTL`]). A holder whose renewal finds the lease gone stops working.

use std::time::Duration;

use tracing::{info, warn};
use warren_schema::lease::Lease;
use warren_schema::{EventId, EventLog, Result};

use tokio_util::sync::CancellationToken;

/// How long a replica that died keeps the work from the others.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often a waiting replica tries the lease.
const LEASE_POLL: Duration = Duration::from_secs(2);

/// Runs `work` until `shutdown` is cancelled, while this replica holds the lease `name`;
/// until then, and after losing it, it waits. `work` resumes from its own checkpoint each
/// time it starts. An error ends it (the caller restarts it).
pub async fn run<F, Fut>(
    log: &EventLog,
    name: &str,
    shutdown: &CancellationToken,
    mut work: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // This run's own name: a second follower in the same process (a test's two replicas)
    // must not count as the holder renewing.
    let holder = format!(
        "{}/{}",
        warren_schema::lease::default_holder(),
        EventId::random()
    );
    loop {
        let lease = loop {
            if let Some(lease) = Lease::try_acquire(log.pool(), name, &holder, LEASE_TTL).await? {
                break lease;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(LEASE_POLL) => {}
            }
        };
        info!(lease = name, "this replica holds the lease and works");
        match lease.hold_while(log.pool(), work()).await? {
            Ok(done) => {
                // Stopping: released, so another replica takes over at once.
                if let Err(e) = lease.release(log.pool()).await {
                    warn!(lease = name, error = %e, "could not release the lease");
                }
                return done;
            }
            Err(lost) => warn!(lease = name, %lost, "another replica works now"),
        }
    }
}

/// Runs `run` until shutdown, restarting it after a failure (a database outage must not
/// stop the work until the next deploy). It resumes from its checkpoint, so a restart
/// neither skips nor repeats what was recorded.
pub async fn supervise<F, Fut>(what: &str, shutdown: CancellationToken, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    const BACKOFF: Duration = Duration::from_secs(5);
    loop {
        match run().await {
            Ok(()) => return,
            Err(e) => warn!(follower = what, error = %e, "failed; restarting in 5 s"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(BACKOFF) => {}
        }
    }
}
