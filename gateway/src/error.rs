//! One error type for the gateway: a kind (which decides the exit code, design.md §2), a message
//! naming the step or the field, and the cause chain.

use std::fmt;

/// What went wrong, as far as the exit code is concerned (design.md §2, sysexits.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 64: the command line is wrong.
    Usage,
    /// 78: the config file is invalid or names something unusable.
    Config,
    /// 74: the database cannot be opened, migrated, read or written.
    Storage,
    /// 75: try again later.
    Temporary,
    /// 70: a bug or an unexpected state.
    Internal,
}

impl Kind {
    /// The process exit code of this kind (design.md §2).
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 64,
            Kind::Config => 78,
            Kind::Storage => 74,
            Kind::Temporary => 75,
            Kind::Internal => 70,
        }
    }
}

/// An error with its kind, one line of its own and an optional cause.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub fn with_source(
        kind: Kind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Kind::Config, message)
    }

    pub fn storage(message: impl Into<String>, source: sqlx::Error) -> Self {
        Self::with_source(Kind::Storage, message, source)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `error: …` then one `caused by: …` line per cause, as the agent prints them.
pub fn report(err: &Error) -> String {
    let mut out = format!("error: {err}");
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        out.push_str(&format!("\ncaused by: {c}"));
        cause = c.source();
    }
    out
}
