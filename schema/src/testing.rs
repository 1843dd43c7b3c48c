//! Test support: one fresh, migrated database per test, on a real PostgreSQL.
//!
//! The server is the one `DATABASE_URL` points at (the test script starts one when none is
//! running). Each [`TestDatabase`] creates a database with a unique name, applies the
//! migrations and drops it when the test ends, so tests run in parallel without sharing
//! state.

#![allow(clippy::unwrap_used)] // test support: a failure here should stop the test loudly

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{EventId, EventLog, Metadata, NewEvent};

/// An event of type `test.happened` with a random id and an empty payload.
pub fn test_event() -> NewEvent {
    NewEvent {
        id: EventId::random(),
        event_type: "test.happened".into(),
        event_version: 1,
        payload: serde_json::json!({}),
        metadata: Metadata::new("test"),
    }
}

/// Server used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server tests run against.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A migrated database that exists for the life of the value.
#[derive(Debug)]
pub struct TestDatabase {
    pub pool: PgPool,
    pub name: String,
    options: PgConnectOptions,
}

impl TestDatabase {
    /// A fresh database with a pool of up to 10 connections.
    pub async fn new() -> Self {
        Self::with_pool_size(10).await
    }

    /// A fresh database with a pool of up to `max_connections`.
    pub async fn with_pool_size(max_connections: u32) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let options: PgConnectOptions = server_url()
            .parse()
            .expect("DATABASE_URL is not a valid PostgreSQL URL");
        let name = format!(
            "warren_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand_suffix()
        );
        let mut admin = PgConnection::connect_with(&options).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at DATABASE_URL ({e}); run the tests with ./scripts/test, \
                 which starts a server"
            )
        });
        // `name` is generated above from digits and a fixed prefix.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();

        let options = options.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options.clone())
            .await
            .unwrap();
        EventLog::new(pool.clone()).migrate().await.unwrap();
        Self {
            pool,
            name,
            options,
        }
    }

    pub fn log(&self) -> EventLog {
        EventLog::new(self.pool.clone())
    }

    /// Connection options for this database (for extra pools or raw connections).
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// A connection string for this database (for external tools).
    pub fn url(&self) -> String {
        let mut url = server_url();
        if let Some(i) = url.rfind('/') {
            let query = url[i..].find('?').map(|q| url[i + q..].to_owned());
            url.truncate(i + 1);
            url.push_str(&self.name);
            if let Some(q) = query {
                url.push_str(&q);
            }
        }
        url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop is synchronous and the test's runtime may be shutting down, so use a thread
        // with a runtime of its own. FORCE ends the test's own pool connections.
        let name = self.name.clone();
        let options = self.options.clone().database("postgres");
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect_with(&options).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
