//! What a workspace asks its control plane for, over NATS request and reply: shared-memory
//! writes ([`crate::memory`]) and pages of the agent directory ([`Directory`]).
//!
//! A workspace asks on subjects of its own (`{prefix}.memory.{workspace}`,
//! `{prefix}.directory.{workspace}`): only its credentials may publish there, so the
//! subject tells the control plane who asks. Answers come back under the workspace's own
//! inbox prefix.

use std::time::Duration;

use warren_schema::nats::{AgentInfo, DirectoryAnswer, DirectoryQuery, Namespace};

/// How long a request waits for a control plane to listen (across a leader hand-over).
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Sends `body` to `subject` and returns the answer. While no control plane listens (one is
/// taking over from another) it is asked again, for up to [`PATIENCE`].
pub async fn ask(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(50);
    loop {
        match client
            .request(subject.to_owned(), body.clone().into())
            .await
        {
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            answer => return answer,
        }
    }
}

/// The agent directory as the control plane records it (what `list_agents` shows), asked
/// for page by page. Nothing of it is cached: an agent configured a moment ago is listed.
#[derive(Debug, Clone)]
pub struct Directory {
    client: async_nats::Client,
    subject: String,
}

/// A page of the directory: agents in name order, and the name to continue after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryPage {
    pub agents: Vec<AgentInfo>,
    pub next: Option<String>,
}

impl Directory {
    pub fn new(client: async_nats::Client, ns: &Namespace, workspace: &str) -> Self {
        Self {
            client,
            subject: ns.directory_subject(workspace),
        }
    }

    /// The agents after `after` (from the first when `None`), at most `limit` (the control
    /// plane's page size when `None`). The error is a sentence for the model.
    #[tracing::instrument(name = "directory.page", skip(self), err(Display))]
    pub async fn page(
        &self,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<DirectoryPage, String> {
        let body = serde_json::to_vec(&DirectoryQuery { after, limit })
            .map_err(|e| format!("the directory query could not be written: {e}"))?;
        let answer = ask(&self.client, &self.subject, body)
            .await
            .map_err(|e| format!("the control plane did not answer the directory query: {e}"))?;
        match serde_json::from_slice::<DirectoryAnswer>(&answer.payload) {
            Ok(DirectoryAnswer::Page { agents, next }) => Ok(DirectoryPage { agents, next }),
            Ok(DirectoryAnswer::Refused { reason } | DirectoryAnswer::Failed { reason }) => {
                Err(reason)
            }
            Err(e) => Err(format!(
                "the control plane's answer is not a directory page: {e}"
            )),
        }
    }
}
