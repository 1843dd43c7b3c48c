//! Leases in PostgreSQL: of several replicas, one does a job and the others wait. The
//! control plane's decisions (`control-plane.leader`) and the gateway's Slack delivery
//! (`gateway.replies`) each run under one.
//!
//! Taking the lease is one statement (insert, or take over an expired row, or renew our own),
//! so two replicas can never both succeed. The holder renews every `ttl / 3`; a replica
//! that is killed stops renewing and a standby takes over once `ttl` has passed. Every
//! transaction that records decisions first checks the lease *in that transaction*
//! ([`Lease::verify_in`]), so a leader that lost the lease (a long pause, a partition)
//! cannot record a decision after the takeover.

use std::time::Duration;

use crate::Error as LogError;
use sqlx::{PgConnection, PgPool};

/// This process's name in a lease when none is configured: host name and process id.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// A lease this replica holds (or held).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// The fence taken with it; changes when anyone else takes the lease.
    pub fence: i64,
    pub ttl: Duration,
}

/// The lease is held by someone else (or expired).
#[derive(Debug, Clone, thiserror::Error)]
#[error("lost the {name} lease (fence {fence}) to another replica")]
pub struct LeaseLost {
    pub name: String,
    pub fence: i64,
}

fn ttl_secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

impl Lease {
    /// Takes the lease if it is free, expired or already ours; `None` while another
    /// replica holds it.
    pub async fn try_acquire(
        pool: &PgPool,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Self>, LogError> {
        let fence: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases (name, holder, fence, expires_at) \
             VALUES ($1, $2, 1, now() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET \
                 fence = CASE WHEN leases.holder = EXCLUDED.holder \
                              THEN leases.fence ELSE leases.fence + 1 END, \
                 acquired_at = CASE WHEN leases.holder = EXCLUDED.holder \
                              THEN leases.acquired_at ELSE now() END, \
                 holder = EXCLUDED.holder, \
                 expires_at = EXCLUDED.expires_at \
             WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now() \
             RETURNING fence",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl_secs(ttl))
        .fetch_optional(pool)
        .await
        .map_err(LogError::db("taking the leader lease"))?;
        Ok(fence.map(|fence| Self {
            name: name.to_owned(),
            holder: holder.to_owned(),
            fence,
            ttl,
        }))
    }

    /// Extends the lease; `Err(LeaseLost)` inside `Ok` when another replica has it now.
    pub async fn renew<'e>(
        &self,
        executor: impl sqlx::PgExecutor<'e>,
    ) -> Result<Result<(), LeaseLost>, LogError> {
        let renewed = sqlx::query(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $4) \
             WHERE name = $1 AND holder = $2 AND fence = $3 AND expires_at > now()",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.fence)
        .bind(ttl_secs(self.ttl))
        .execute(executor)
        .await
        .map_err(LogError::db("renewing the leader lease"))?
        .rows_affected();
        Ok(if renewed == 1 {
            Ok(())
        } else {
            Err(self.lost())
        })
    }

    /// Checks, inside `tx`, that the lease is still ours and unexpired, and holds it (a
    /// takeover waits) until `tx` ends.
    pub async fn verify_in(
        &self,
        tx: &mut PgConnection,
    ) -> Result<Result<(), LeaseLost>, LogError> {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT fence FROM leases \
             WHERE name = $1 AND holder = $2 AND fence = $3 AND expires_at > now() \
             FOR SHARE",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.fence)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LogError::db("checking the leader lease"))?;
        Ok(if held.is_some() {
            Ok(())
        } else {
            Err(self.lost())
        })
    }

    /// Runs `work` while renewing the lease every `ttl / 3`, so that long work (a new
    /// leader replaying a large log) does not cost the lease: without it, a log that takes
    /// longer than the TTL to load would pass the lease from replica to replica, each
    /// deposed before it decides anything. Returns `Err(LeaseLost)` inside `Ok` as soon as
    /// a renewal finds the lease gone; `work` is dropped then.
    ///
    /// Renewals run in a task of their own, on a connection of their own: under a backlog
    /// the work can hold every pooled connection, take longer than the TTL for one step, or
    /// keep its task busy computing for seconds, and none of it may cost the lease. (All
    /// did: a control plane fed 10,000 messages at once was deposed five times in seven
    /// minutes while renewing between steps from the pool, and once more while renewing
    /// beside the work in the same task.)
    pub async fn hold_while<F: Future>(
        &self,
        pool: &PgPool,
        work: F,
    ) -> Result<Result<F::Output, LeaseLost>, LogError> {
        let mut connection = pool
            .acquire()
            .await
            .map_err(LogError::db("connecting to renew the leader lease"))?
            .detach();
        let lease = self.clone();
        let renewing = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut renew = tokio::time::interval(lease.ttl / 3);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: the lease was just taken or renewed.
            renew.tick().await;
            loop {
                renew.tick().await;
                if let Err(lost) = lease.renew(&mut connection).await? {
                    return Ok::<_, LogError>(lost);
                }
            }
        }));
        tokio::select! {
            out = work => Ok(Ok(out)),
            renewed = renewing => match renewed {
                Ok(Ok(lost)) => Ok(Err(lost)),
                Ok(Err(e)) => Err(e),
                // The task panicked: nothing renews the lease any more, so it is as good
                // as lost; the work stops.
                Err(_) => Ok(Err(self.lost())),
            },
        }
    }

    /// Gives the lease up (on shutdown), so a standby takes over at once.
    pub async fn release(&self, pool: &PgPool) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE leases SET expires_at = now() - interval '1 second' \
             WHERE name = $1 AND holder = $2 AND fence = $3",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.fence)
        .execute(pool)
        .await
        .map_err(LogError::db("releasing the leader lease"))?;
        Ok(())
    }

    fn lost(&self) -> LeaseLost {
        LeaseLost {
            name: self.name.clone(),
            fence: self.fence,
        }
    }
}
