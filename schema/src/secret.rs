//! Secrets that never reach a log line: `Debug` and `Display` print `[redacted]`.

use std::fmt;

/// A secret string (token, password, connection string with a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("both {var} and {flag} are set; give one")]
    Both { var: String, flag: String },
    #[error("reading {path} ({var}): {source}")]
    File {
        var: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{var} is empty; set it or unset it")]
    Empty { var: String },
}

impl Secret {
    /// A secret from the environment variable `var`, or from `file` (a path given as a flag,
    /// its trailing newline ignored), or `None` when neither is set. Secrets are never
    /// flags: a command line is visible to every user of the machine (`ps`, `/proc`). An
    /// empty secret is an error, never "no secret" (an empty signing key lets anyone sign).
    pub fn from_env_or_file(
        var: &str,
        file: Option<&std::path::Path>,
    ) -> Result<Option<Self>, SecretError> {
        Self::from_value_or_file(var, std::env::var(var).ok(), file)
    }

    /// [`Self::from_env_or_file`] with the variable's value given (pure but for the file).
    pub fn from_value_or_file(
        var: &str,
        value: Option<String>,
        file: Option<&std::path::Path>,
    ) -> Result<Option<Self>, SecretError> {
        let secret = match (value, file) {
            (Some(_), Some(_)) => {
                return Err(SecretError::Both {
                    var: var.to_owned(),
                    flag: format!("--{}-file", var.to_lowercase().replace('_', "-")),
                });
            }
            (Some(v), None) => v,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| SecretError::File {
                    var: var.to_owned(),
                    path: path.to_owned(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            (None, None) => return Ok(None),
        };
        if secret.trim().is_empty() {
            return Err(SecretError::Empty {
                var: var.to_owned(),
            });
        }
        Ok(Some(Self(secret)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_its_variable_or_its_file_never_both_never_empty() {
        let var = "WARREN_TEST_SECRET";
        let read = |v: Option<&str>, f: Option<&std::path::Path>| {
            Secret::from_value_or_file(var, v.map(str::to_owned), f)
        };
        assert_eq!(
            read(Some("s3cret"), None).expect("set"),
            Some(Secret::new("s3cret"))
        );
        assert_eq!(read(None, None).expect("unset"), None);
        let e = read(Some(" "), None).expect_err("blank");
        assert!(e.to_string().contains("WARREN_TEST_SECRET is empty"), "{e}");
        let file = std::env::temp_dir().join(format!("warren-secret-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").expect("file");
        assert_eq!(
            read(None, Some(&file)).expect("file"),
            Some(Secret::new("from-file"))
        );
        let e = read(Some("x"), Some(&file)).expect_err("both");
        assert!(e.to_string().contains("--warren-test-secret-file"), "{e}");
        std::fs::write(&file, "\n").expect("file");
        assert!(read(None, Some(&file)).is_err(), "an empty file");
        std::fs::remove_file(&file).expect("rm");
        let e = read(None, Some(&file)).expect_err("missing file");
        assert!(!e.to_string().contains("from-file"), "{e}");
    }

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("postgres://warren:hunter2@db/warren");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
        assert_eq!(s.expose(), "postgres://warren:hunter2@db/warren");
    }
}
