//! Warren's workspace runtime: runs inside each workspace, hosts its agents, takes their
//! messages from NATS JetStream and gives them shared memory and files.
//!
//! Not built yet (issue 5). The crate exists so the workspace shows the architecture; it
//! has no binary until it does something.
