//! NATS credentials: every workspace connects as a user of its own, with permissions for its
//! own subjects only (NATS decentralized JWT auth).
//!
//! The trust chain is NATS's: an operator key signs Warren's account (and a system account),
//! the server trusts the operator (`nats-auth init` writes that server configuration), and
//! the control plane holds the account key and signs a user JWT per workspace when it starts
//! one ([`Issuer::workspace_credentials`], permissions from
//! [`Namespace::workspace_permissions`]). The server checks each connection's JWT and
//! refuses whatever its permissions do not allow; nothing is looked up at connect time.
//!
//! A credentials file (`.creds`) is the user JWT and the user's seed in NATS's armoured
//! format, what every NATS client reads.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};
use sha2::Digest;
use warren_schema::Secret;
use warren_schema::nats::{Namespace, Permissions};

/// Why credentials could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the account seed {path}: {source}")]
    ReadSeed {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The message never contains the seed.
    #[error("the account seed is not an NATS account seed (it should start with SA): {0}")]
    BadSeed(String),
    #[error("signing: {0}")]
    Sign(String),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The largest message a workspace may publish (bytes): an agent's reply or memory value
/// fits many times over; a flood of big ones does not.
pub const WORKSPACE_MAX_PAYLOAD: i64 = 512 << 10;

/// Subscriptions one workspace connection may hold (a runtime holds one per agent and a
/// few more).
pub const WORKSPACE_MAX_SUBSCRIPTIONS: i64 = 256;

/// Signs workspace users with Warren's account key.
pub struct Issuer {
    account: KeyPair,
    ns: Namespace,
    /// How long a workspace's credentials are valid (the JWT's `exp`); `None`: forever.
    lifetime: Option<std::time::Duration>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("account", &self.account.public_key())
            .field("ns", &self.ns)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Issuer {
    /// `seed`: the account's seed (`SA...`).
    pub fn new(seed: &Secret, ns: Namespace) -> Result<Self, AuthError> {
        let account = KeyPair::from_seed(seed.expose().trim())
            .map_err(|e| AuthError::BadSeed(e.to_string()))?;
        if account.key_pair_type() != nkeys::KeyPairType::Account {
            return Err(AuthError::BadSeed(format!(
                "it is a {:?} seed",
                account.key_pair_type()
            )));
        }
        Ok(Self {
            account,
            ns,
            lifetime: None,
        })
    }

    /// Workspace credentials expire `lifetime` after they are issued: a stopped workspace's
    /// leftover credentials stop working, and a running one gets new ones in time (the
    /// backend renews them at half their lifetime; the runtime reads its credentials file
    /// again at every reconnect).
    pub fn with_lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    pub fn lifetime(&self) -> Option<std::time::Duration> {
        self.lifetime
    }

    /// Reads the account seed from a file (what `nats-auth init` wrote).
    pub fn from_seed_file(path: &Path, ns: Namespace) -> Result<Self, AuthError> {
        let seed = std::fs::read_to_string(path).map_err(|source| AuthError::ReadSeed {
            path: path.to_owned(),
            source,
        })?;
        Self::new(&Secret::new(seed), ns)
    }

    /// The account's public key (what the server knows it by).
    pub fn account(&self) -> String {
        self.account.public_key()
    }

    /// Credentials for the runtime of `workspace` hosting `agents`: its own subjects only.
    pub fn workspace_credentials(
        &self,
        workspace: &str,
        agents: &[String],
    ) -> Result<Secret, AuthError> {
        let permissions = self.ns.workspace_permissions(workspace, agents);
        user_credentials(
            &self.account,
            &format!("workspace-{workspace}"),
            Some(&permissions),
            self.lifetime,
        )
    }

    /// Credentials with the account's every permission (the control plane, operators' tools).
    pub fn full_credentials(&self, name: &str) -> Result<Secret, AuthError> {
        user_credentials(&self.account, name, None, None)
    }
}

/// A new user signed by `account`, as a `.creds` file.
fn user_credentials(
    account: &KeyPair,
    name: &str,
    permissions: Option<&Permissions>,
    lifetime: Option<std::time::Duration>,
) -> Result<Secret, AuthError> {
    let user = KeyPair::new_user();
    let mut nats = json!({
        "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    if let Some(p) = permissions {
        nats["pub"] = json!({ "allow": p.publish });
        nats["sub"] = json!({ "allow": p.subscribe });
        // A workspace's connection: bounded messages and subscriptions.
        nats["payload"] = json!(WORKSPACE_MAX_PAYLOAD);
        nats["subs"] = json!(WORKSPACE_MAX_SUBSCRIPTIONS);
    }
    let jwt = encode(&user.public_key(), name, nats, account, lifetime)?;
    let seed = user.seed().map_err(|e| AuthError::Sign(e.to_string()))?;
    Ok(Secret::new(format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )))
}

/// A NATS JWT: `subject`'s claims signed by `issuer` (ed25519, NATS's `ed25519-nkey`),
/// expiring `lifetime` from now if given.
fn encode(
    subject: &str,
    name: &str,
    nats: Value,
    issuer: &KeyPair,
    lifetime: Option<std::time::Duration>,
) -> Result<String, AuthError> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(lifetime) = lifetime {
        // Whole seconds, at least one: NATS compares `exp` with the clock in seconds.
        claims["exp"] = json!(now + (lifetime.as_secs() as i64).max(1));
    }
    // The JWT id is a hash of the claims without it, as NATS's own tools make it.
    let digest = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(&digest));
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| AuthError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// A new trust chain for one NATS deployment: the operator, the system account and Warren's
/// account. Made once by `warren-control-plane nats-auth init`.
pub struct Bootstrap {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .finish()
    }
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self::new()
    }
}

impl Bootstrap {
    pub fn new() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
        }
    }

    /// The account's seed, for [`Issuer::new`].
    pub fn account_seed(&self) -> Result<Secret, AuthError> {
        self.account
            .seed()
            .map(Secret::new)
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// The server's side: trust the operator, know both accounts (memory resolver, JWTs
    /// inline). Include it in `nats-server.conf`; JetStream is enabled for Warren's account
    /// without limits.
    pub fn server_config(&self) -> Result<String, AuthError> {
        let operator = encode(
            &self.operator.public_key(),
            "warren",
            json!({ "type": "operator", "version": 2,
                    "system_account": self.system.public_key() }),
            &self.operator,
            None,
        )?;
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        let system = encode(
            &self.system.public_key(),
            "SYS",
            json!({ "type": "account", "version": 2, "limits": unlimited }),
            &self.operator,
            None,
        )?;
        let mut limits = unlimited;
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
        let account = encode(
            &self.account.public_key(),
            "WARREN",
            json!({ "type": "account", "version": 2, "limits": limits }),
            &self.operator,
            None,
        )?;
        Ok(format!(
            "# Warren's NATS trust chain (warren-control-plane nats-auth init).\n\
             # Operator {op}; Warren's account {acc}.\n\
             operator: {operator}\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {system}\n  {acc}: {account}\n}}\n",
            op = self.operator.public_key(),
            acc = self.account.public_key(),
            sys = self.system.public_key(),
        ))
    }

    /// Writes `auth.conf` (include it in the server's configuration), `account.seed` (the
    /// control plane's signing key, mode 0600) and `control-plane.creds` (mode 0600) to `dir`.
    pub fn write(&self, dir: &Path, ns: &Namespace) -> Result<(), AuthError> {
        let issuer = Issuer::new(&self.account_seed()?, ns.clone())?;
        write_file(&dir.join("auth.conf"), &self.server_config()?, 0o644)?;
        write_file(
            &dir.join("account.seed"),
            &format!("{}\n", self.account_seed()?.expose()),
            0o600,
        )?;
        write_file(
            &dir.join("control-plane.creds"),
            issuer.full_credentials("control-plane")?.expose(),
            0o600,
        )
    }
}

/// Writes a file readable only as `mode` says, from its creation on.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| AuthError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(jwt: &str) -> Value {
        let body = jwt.split('.').nth(1).expect("three parts");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).expect("base64url")).expect("json")
    }

    fn jwt_of(creds: &str) -> &str {
        creds.lines().nth(1).expect("the JWT line")
    }

    #[test]
    fn workspace_credentials_expire_after_the_lifetime_and_others_do_not() {
        let boot = Bootstrap::new();
        let seed = boot.account_seed().expect("seed");
        let forever = Issuer::new(&seed, Namespace::default()).expect("issuer");
        let hourly = Issuer::new(&seed, Namespace::default())
            .expect("issuer")
            .with_lifetime(std::time::Duration::from_secs(3600));
        let c = claims(jwt_of(
            hourly.workspace_credentials("w", &[]).expect("c").expose(),
        ));
        let (iat, exp) = (
            c["iat"].as_i64().expect("iat"),
            c["exp"].as_i64().expect("exp"),
        );
        assert_eq!(exp - iat, 3600);
        let c = claims(jwt_of(
            forever.workspace_credentials("w", &[]).expect("c").expose(),
        ));
        assert!(c.get("exp").is_none(), "{c}");
        // The control plane's own user never expires (nothing renews it).
        let c = claims(jwt_of(hourly.full_credentials("cp").expect("c").expose()));
        assert!(c.get("exp").is_none(), "{c}");
    }

    #[test]
    fn workspace_jwt_is_signed_by_the_account_and_carries_its_permissions() {
        let boot = Bootstrap::new();
        let issuer =
            Issuer::new(&boot.account_seed().expect("seed"), Namespace::default()).expect("issuer");
        let creds = issuer
            .workspace_credentials("research", &["alice".into()])
            .expect("creds");
        let jwt = jwt_of(creds.expose());
        let (signed, signature) = jwt.rsplit_once('.').expect("signature");
        KeyPair::from_public_key(&issuer.account())
            .expect("public key")
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).expect("base64url"),
            )
            .expect("the account's signature verifies");
        let c = claims(jwt);
        assert_eq!(c["iss"], issuer.account());
        assert!(c["sub"].as_str().is_some_and(|s| s.starts_with('U')));
        assert_eq!(c["nats"]["type"], "user");
        let expected = Namespace::default().workspace_permissions("research", &["alice".into()]);
        assert_eq!(c["nats"]["pub"]["allow"], json!(expected.publish));
        assert_eq!(c["nats"]["sub"]["allow"], json!(expected.subscribe));
        assert_eq!(c["nats"]["payload"], WORKSPACE_MAX_PAYLOAD);
        assert_eq!(c["nats"]["subs"], WORKSPACE_MAX_SUBSCRIPTIONS);
        // The seed in the file is the user's, the subject's own.
        let seed = creds
            .expose()
            .lines()
            .find(|l| l.starts_with("SU"))
            .expect("seed");
        assert_eq!(
            KeyPair::from_seed(seed).expect("seed").public_key(),
            c["sub"].as_str().expect("sub")
        );
    }

    #[test]
    fn every_workspace_gets_a_user_of_its_own() {
        let boot = Bootstrap::new();
        let issuer =
            Issuer::new(&boot.account_seed().expect("seed"), Namespace::default()).expect("ok");
        let a = issuer.workspace_credentials("a", &[]).expect("a");
        let b = issuer.workspace_credentials("a", &[]).expect("a again");
        assert_ne!(
            claims(jwt_of(a.expose()))["sub"],
            claims(jwt_of(b.expose()))["sub"]
        );
    }

    #[test]
    fn server_config_preloads_both_accounts_signed_by_the_operator() {
        let boot = Bootstrap::new();
        let conf = boot.server_config().expect("config");
        let operator_jwt = conf
            .lines()
            .find_map(|l| l.strip_prefix("operator: "))
            .expect("operator line");
        let op = claims(operator_jwt);
        assert_eq!(op["iss"], op["sub"], "the operator signs itself");
        let account_line = conf
            .lines()
            .find(|l| l.trim_start().starts_with(&boot.account.public_key()))
            .expect("account preloaded");
        let account = claims(account_line.split(": ").nth(1).expect("jwt"));
        assert_eq!(account["iss"], op["sub"]);
        assert_eq!(
            account["nats"]["limits"]["disk_storage"], -1,
            "JetStream enabled"
        );
    }

    #[test]
    fn a_seed_of_the_wrong_kind_is_refused_without_echoing_it() {
        let user = KeyPair::new_user().seed().expect("seed");
        let err = Issuer::new(&Secret::new(user.clone()), Namespace::default())
            .expect_err("a user seed cannot sign users");
        assert!(!err.to_string().contains(&user), "{err}");
        let err =
            Issuer::new(&Secret::new("SAnot-a-seed"), Namespace::default()).expect_err("garbage");
        assert!(!err.to_string().contains("not-a-seed"), "{err}");
    }
}
