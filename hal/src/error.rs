//! The one error type of this crate. `Display` names the step and the path; `source()` links the
//! operating-system cause. Nothing here ever formats key material.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// A filesystem operation failed.
    Io { step: &'static str, path: PathBuf, source: io::Error },
    /// A path exists but its mode or owner would expose or let others replace secrets.
    Permissions { path: PathBuf, detail: String },
    /// A key could not be generated, parsed or used.
    Key { step: &'static str, detail: String },
    /// The token refused the PIN. Never retried automatically: tokens lock after a few wrong PINs.
    Pin { detail: String },
    /// Another run holds the state directory's lock (a temporary condition).
    Locked { path: PathBuf, waited_s: u64 },
}

impl Error {
    pub(crate) fn io(step: &'static str, path: &Path, source: io::Error) -> Self {
        Error::Io { step, path: path.to_path_buf(), source }
    }

    pub(crate) fn key(step: &'static str, detail: impl Into<String>) -> Self {
        Error::Key { step, detail: detail.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { step, path, .. } => write!(f, "{step} {}", path.display()),
            Error::Permissions { path, detail } => write!(f, "{}: {detail}", path.display()),
            Error::Key { step, detail } => write!(f, "{step}: {detail}"),
            Error::Locked { path, waited_s } => write!(
                f,
                "another enroll-agent run holds the lock {} (waited {waited_s} s); try again when it has finished",
                path.display()
            ),
            Error::Pin { detail } => write!(
                f,
                "the token refused the PIN ({detail}); not retrying, since tokens lock after a few wrong PINs: \
                 fix pin_file"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
