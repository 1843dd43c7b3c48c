//! Files attached to Slack messages, downloaded for the agents.
//!
//! A follower of the log (checkpoint [`CHECKPOINT`]; one replica at a time, under the lease
//! of the replica that talks to Slack, [`crate::replies::DELIVERY_LEASE`]). For each `message.received` from Slack with files it downloads each
//! file with the bot token and stores it in `message_files`, with its `message.file_stored`
//! event, in one transaction; or it records `message.file_refused` with the reason. The
//! control plane serves stored files to the workspaces the message is routed to; the bot
//! token never leaves the gateway.
//!
//! What is refused, and never downloaded ([`plan`]): a file without a download address, at
//! an address that is not Slack's file host (`SLACK_FILES_URL`: the token goes only there),
//! or announced larger than the limit. A download that passes the limit is stopped there.
//!
//! Nothing is done twice: a file already recorded (stored or refused) is not downloaded
//! again when a restart passes its message again, and the events' ids derive from the
//! message and the file.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::event_log::projection;
use warren_schema::event_log::{SubscriptionOptions, append_in_tx};
use warren_schema::events::{
    DomainEvent, FileRef, MessageFileRefused, MessageFileStored, MessageReceived, Origin,
    message_file_event_id,
};
use warren_schema::{AppendRequest, Error, EventLog, Metadata, NewEvent, RecordedEvent, Result};

use crate::slack_api::{Download, SlackApi, SlackApiError};

/// The checkpoint of the file follower.
pub const CHECKPOINT: &str = "gateway.files";

/// Where files may come from and how large they may be.
#[derive(Debug, Clone)]
pub struct FileLimits {
    /// Slack's file host: a download address must start with it (`https://files.slack.com/`).
    pub files_url: String,
    /// Largest file downloaded, bytes.
    pub max_bytes: u64,
}

/// What to do with one attached file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Download { url: String },
    Refuse { reason: String },
}

/// Whether `file` is downloaded, before anything is fetched. Pure.
pub fn plan(file: &FileRef, limits: &FileLimits) -> Plan {
    let refuse = |reason: String| Plan::Refuse { reason };
    let Some(url) = &file.url else {
        return refuse("Slack gave no download address for it".into());
    };
    if !url.starts_with(&limits.files_url) {
        return refuse(format!(
            "its address is not on Slack's file host ({})",
            limits.files_url
        ));
    }
    match file.size {
        Some(size) if size > limits.max_bytes => refuse(format!(
            "{size} bytes, larger than the gateway's limit of {} bytes",
            limits.max_bytes
        )),
        _ => Plan::Download { url: url.clone() },
    }
}

/// Whether a download is the file, not Slack's sign-in page (what Slack answers, with 200,
/// when the app lacks the `files:read` scope). Pure.
pub fn check(file: &FileRef, download: &Download) -> std::result::Result<(), String> {
    let html = |t: &str| t.trim_start().to_ascii_lowercase().starts_with("text/html");
    let got_html = download.content_type.as_deref().is_some_and(html);
    let is_html = file.mimetype.as_deref().is_some_and(html);
    if got_html && !is_html {
        return Err(
            "Slack answered with a web page instead of the file: the app needs the files:read \
             scope"
                .into(),
        );
    }
    Ok(())
}

/// Longest name a file is saved under, bytes.
const MAX_NAME_BYTES: usize = 120;

/// The name a file is saved under in a workspace: Slack's name without directories, control
/// characters or a leading dot, cut to [`MAX_NAME_BYTES`]; the file's id when nothing is
/// left. A name can never climb out of its directory or hide. Pure.
pub fn safe_name(name: Option<&str>, id: &str) -> String {
    let last = name
        .unwrap_or_default()
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();
    let cleaned: String = last
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    let mut out = cleaned.trim().trim_start_matches('.').trim().to_owned();
    if out.len() > MAX_NAME_BYTES {
        let mut end = MAX_NAME_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    if out.is_empty() { safe_id(id) } else { out }
}

/// A Slack file id as a name (they are `F` and letters and digits; anything else goes).
fn safe_id(id: &str) -> String {
    let id: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    if id.is_empty() { "file".into() } else { id }
}

/// What became of one file.
#[derive(Debug)]
enum Outcome {
    Stored { name: String, bytes: Vec<u8> },
    Refused { reason: String },
}

/// Downloads and records files until `shutdown` is cancelled, while this replica holds
/// the Slack lease. Without a bot token (`slack` is `None`) every file is recorded as
/// refused, so that no turn waits for a file that cannot come. An error ends it (the
/// caller restarts it). With a token the gateway runs the downloads beside reply delivery
/// ([`crate::run_slack_followers`]).
pub async fn run(
    log: EventLog,
    slack: Option<SlackApi>,
    limits: FileLimits,
    shutdown: CancellationToken,
) -> Result<()> {
    crate::leased::run(&log, crate::replies::DELIVERY_LEASE, &shutdown, || {
        follow(&log, slack.as_ref(), &limits, &shutdown)
    })
    .await
}

pub(crate) async fn follow(
    log: &EventLog,
    slack: Option<&SlackApi>,
    limits: &FileLimits,
    shutdown: &CancellationToken,
) -> Result<()> {
    let from = projection::load_checkpoint(log.pool(), CHECKPOINT).await?;
    let options = SubscriptionOptions {
        name: CHECKPOINT.into(),
        ..SubscriptionOptions::default()
    };
    let mut subscription = log.subscribe(from, options).await?;
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            batch = subscription.next_batch() => batch?,
        };
        for event in &batch {
            let Some(files) = attached(event) else {
                continue;
            };
            for file in &files {
                let span = info_span!("slack_file", message = %event.id, file = %file.id);
                let done = fetch_and_record(log, slack, limits, event, file, shutdown)
                    .instrument(span)
                    .await?;
                if !done {
                    // Shutting down mid-download: the checkpoint stays before this message.
                    return Ok(());
                }
            }
        }
        if let Some(last) = batch.last() {
            let mut conn = log
                .pool()
                .acquire()
                .await
                .map_err(Error::db("storing the files checkpoint"))?;
            projection::store_checkpoint(&mut conn, CHECKPOINT, last.position).await?;
        }
    }
}

/// The files of a Slack message, if `event` is one with files.
fn attached(event: &RecordedEvent) -> Option<Vec<FileRef>> {
    if event.event_type != MessageReceived::TYPE {
        return None;
    }
    let message: MessageReceived = match event.decode() {
        Ok(m) => m,
        Err(e) => {
            warn!(position = event.position, error = %e, "unreadable message.received; skipped");
            return None;
        }
    };
    let from_slack = matches!(message.origin, Origin::Slack { .. });
    (from_slack && !message.files.is_empty()).then_some(message.files)
}

/// One file: downloaded and stored, or refused, and recorded. `false` when shutdown
/// interrupted it (nothing recorded).
async fn fetch_and_record(
    log: &EventLog,
    slack: Option<&SlackApi>,
    limits: &FileLimits,
    message: &RecordedEvent,
    file: &FileRef,
    shutdown: &CancellationToken,
) -> Result<bool> {
    if log
        .get(message_file_event_id(message.id, &file.id))
        .await?
        .is_some()
    {
        // Stored or refused before (a restart passing the message again).
        return Ok(true);
    }
    let outcome = match (plan(file, limits), slack) {
        (Plan::Refuse { reason }, _) => Outcome::Refused { reason },
        (Plan::Download { .. }, None) => Outcome::Refused {
            reason: "the gateway has no Slack bot token (SLACK_BOT_TOKEN), so it downloads \
                     no files"
                .into(),
        },
        (Plan::Download { url }, Some(slack)) => {
            let Some(downloaded) = download(slack, &url, limits.max_bytes, shutdown).await else {
                return Ok(false);
            };
            match downloaded.and_then(|d| check(file, &d).map(|()| d)) {
                Ok(d) => Outcome::Stored {
                    name: safe_name(file.name.as_deref(), &file.id),
                    bytes: d.bytes,
                },
                Err(reason) => Outcome::Refused { reason },
            }
        }
    };
    let result = match &outcome {
        Outcome::Stored { bytes, .. } => {
            info!(bytes = bytes.len(), "file stored");
            "stored"
        }
        Outcome::Refused { reason } => {
            warn!(%reason, "file refused");
            "refused"
        }
    };
    record(log, message, file, outcome).await?;
    metrics::counter!("warren_gateway_slack_files_total", "result" => result).increment(1);
    Ok(true)
}

/// Attempts for a failing download (rate limits are waited out and do not count).
const ATTEMPTS: u32 = 6;

/// The download, with retries; `Err` is the reason it is refused, `None` a shutdown.
async fn download(
    slack: &SlackApi,
    url: &str,
    limit: u64,
    shutdown: &CancellationToken,
) -> Option<std::result::Result<Download, String>> {
    let mut failures = 0;
    loop {
        let wait = match slack.download(url, limit).await {
            Ok(d) => return Some(Ok(d)),
            Err(SlackApiError::RateLimited(d)) => d,
            Err(SlackApiError::Transient(e)) if failures + 1 < ATTEMPTS => {
                failures += 1;
                warn!(error = %e, attempt = failures, "file download failed; retrying");
                Duration::from_millis(250 * 2u64.pow(failures))
            }
            Err(SlackApiError::Transient(e)) => {
                return Some(Err(format!(
                    "Slack did not serve it after {ATTEMPTS} attempts: {e}"
                )));
            }
            Err(SlackApiError::Refused(e)) => return Some(Err(e)),
        };
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The file's row (when stored) and its event, in one transaction.
async fn record(
    log: &EventLog,
    message: &RecordedEvent,
    file: &FileRef,
    outcome: Outcome,
) -> Result<()> {
    let id = message_file_event_id(message.id, &file.id);
    let metadata = Metadata::caused_by(message, "gateway/files");
    let invalid = |e: serde_json::Error| Error::InvalidEvent(e.to_string());
    let mut tx = log
        .pool()
        .begin()
        .await
        .map_err(Error::db("beginning a file transaction"))?;
    let event = match outcome {
        Outcome::Stored { name, bytes } => {
            let sha256 = hex::encode(Sha256::digest(&bytes));
            sqlx::query(
                "INSERT INTO message_files \
                   (message_id, file_id, name, mimetype, size, sha256, content) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (message_id, file_id) DO NOTHING",
            )
            .bind(message.id.0)
            .bind(&file.id)
            .bind(&name)
            .bind(&file.mimetype)
            .bind(bytes.len() as i64)
            .bind(&sha256)
            .bind(&bytes)
            .execute(&mut *tx)
            .await
            .map_err(Error::db("storing a file"))?;
            NewEvent::from_domain(
                id,
                &MessageFileStored {
                    message_id: message.id,
                    file_id: file.id.clone(),
                    name,
                    mimetype: file.mimetype.clone(),
                    size: bytes.len() as u64,
                    sha256,
                },
                metadata,
            )
            .map_err(invalid)?
        }
        Outcome::Refused { reason } => NewEvent::from_domain(
            id,
            &MessageFileRefused {
                message_id: message.id,
                file_id: file.id.clone(),
                name: file.name.clone(),
                reason,
            },
            metadata,
        )
        .map_err(invalid)?,
    };
    let request = AppendRequest::new(message.stream.clone(), vec![event]);
    append_in_tx(&mut tx, &[&request]).await?.remove(0)?;
    tx.commit()
        .await
        .map_err(Error::db("committing a stored file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(url: Option<&str>, size: Option<u64>) -> FileRef {
        FileRef {
            id: "F1".into(),
            name: Some("a.txt".into()),
            mimetype: Some("text/plain".into()),
            url: url.map(str::to_owned),
            size,
        }
    }

    fn limits() -> FileLimits {
        FileLimits {
            files_url: "https://files.slack.com/".into(),
            max_bytes: 1000,
        }
    }

    #[test]
    fn only_slack_addresses_within_the_limit_are_downloaded() {
        let url = "https://files.slack.com/files-pri/T1-F1/download/a.txt";
        assert_eq!(
            plan(&file(Some(url), Some(1000)), &limits()),
            Plan::Download { url: url.into() }
        );
        assert_eq!(
            plan(&file(Some(url), None), &limits()),
            Plan::Download { url: url.into() },
            "an unknown size is counted while downloading"
        );
        let refused = |f: FileRef| match plan(&f, &limits()) {
            Plan::Refuse { reason } => reason,
            Plan::Download { .. } => panic!("downloaded {f:?}"),
        };
        assert!(refused(file(Some(url), Some(1001))).contains("limit of 1000 bytes"));
        assert!(refused(file(None, Some(1))).contains("no download address"));
        for elsewhere in [
            "https://evil.test/files.slack.com/a",
            "https://files.slack.com.evil.test/a",
            "http://files.slack.com/a",
        ] {
            assert!(
                refused(file(Some(elsewhere), Some(1))).contains("not on Slack's file host"),
                "{elsewhere}"
            );
        }
    }

    #[test]
    fn a_sign_in_page_is_not_the_file() {
        let got = |content_type: Option<&str>| Download {
            bytes: b"<!DOCTYPE html>".to_vec(),
            content_type: content_type.map(str::to_owned),
        };
        let text = file(None, None);
        assert!(
            check(&text, &got(Some("text/html; charset=utf-8")))
                .expect_err("refused")
                .contains("files:read")
        );
        assert!(check(&text, &got(Some("text/plain"))).is_ok());
        assert!(check(&text, &got(None)).is_ok());
        let page = FileRef {
            mimetype: Some("text/html".into()),
            ..file(None, None)
        };
        assert!(
            check(&page, &got(Some("text/html"))).is_ok(),
            "an HTML file"
        );
    }

    #[test]
    fn names_stay_in_their_directory_and_in_sight() {
        assert_eq!(safe_name(Some("report Q3.pdf"), "F1"), "report Q3.pdf");
        assert_eq!(safe_name(Some("../../etc/passwd"), "F1"), "passwd");
        assert_eq!(safe_name(Some("..\\..\\boot.ini"), "F1"), "boot.ini");
        assert_eq!(safe_name(Some(".bashrc"), "F1"), "bashrc");
        assert_eq!(safe_name(Some(".."), "F1"), "F1");
        assert_eq!(safe_name(Some("dir/"), "F1"), "F1");
        assert_eq!(safe_name(None, "F1"), "F1");
        assert_eq!(safe_name(None, "../x"), "x");
        assert_eq!(safe_name(None, "/"), "file");
        assert_eq!(safe_name(Some("a\nb\u{7}c:d"), "F1"), "a_b_c_d");
        let long = "é".repeat(100);
        let cut = safe_name(Some(&long), "F1");
        assert!(cut.len() <= MAX_NAME_BYTES && cut.chars().all(|c| c == 'é'));
    }
}
