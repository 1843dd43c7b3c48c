//! Cancelled work leaves the connection pool clean.
//!
//! A replica killed mid-decision, a gateway request whose client hung up, a `select!` that
//! lost a race: each drops a future that may be in the middle of `BEGIN`. The connection
//! must not go back to the pool still inside that transaction. If it did, the next
//! borrower's single statements would run in it. They would never commit, and they would
//! hold their row locks. Seen as a standby that could never take the leader lease
//! (transact-rs/sqlx#4393; the fix is in `vendor/sqlx-postgres`).

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use sqlx::{Connection, PgConnection};
use warren_schema::testing::TestDatabase;

/// Polls `future` `polls` times (yielding between polls, so I/O makes progress), then drops
/// it unfinished. Returns whether it finished first.
async fn cancel_after<F: Future>(future: F, polls: usize) -> bool {
    let mut future = pin!(future);
    for _ in 0..polls {
        let done =
            std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_ready())).await;
        if done {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

#[tokio::test]
async fn a_begin_cancelled_in_flight_leaves_no_open_transaction_in_the_pool() {
    // One connection, so every borrower gets the one a cancelled `begin` touched.
    let db = TestDatabase::with_pool_size(1).await;
    sqlx::query("CREATE TABLE marks (n int NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("table");
    let mut observer = PgConnection::connect_with(&db.connect_options())
        .await
        .expect("observer");

    let (mut cancelled, mut finished) = (0, 0);
    for n in 0..300_i32 {
        // Cancel at every depth from "not yet sent" to "answered" (a begin takes about 90
        // polls here): somewhere in between, BEGIN has reached the server and its answer has
        // not been read.
        if cancel_after(db.pool.begin(), 1 + (n as usize % 150)).await {
            finished += 1;
        } else {
            cancelled += 1;
        }
        // The next borrower: one autocommit statement, which must be committed.
        sqlx::query("INSERT INTO marks (n) VALUES ($1)")
            .bind(n)
            .execute(&db.pool)
            .await
            .expect("insert");
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM marks WHERE n = $1")
            .bind(n)
            .fetch_one(&mut observer)
            .await
            .expect("count");
        assert_eq!(
            seen, 1,
            "after cancelled begin #{n}, an autocommit insert is not visible to another \
             connection: the pooled connection was handed out inside the cancelled transaction"
        );
    }
    assert!(
        cancelled > 0 && finished > 0,
        "cancelled {cancelled}, finished {finished}: the cancellation points did not span a begin"
    );
}
