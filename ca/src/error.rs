//! The agent's error chain and its exit codes (design.md §2, sysexits.h).
//!
//! Each error carries the [`Kind`] that decides the exit code, a message describing only its own
//! step, and the cause below it. `main` prints `error: …` then one `caused by: …` per link.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 64: bad command line.
    Usage,
    /// 78: the config file (or a file it names) is invalid.
    Config,
    /// 75: the CA was unreachable, slow or failing, or a request is still pending; retry later.
    Temporary,
    /// 76: the CA answered and the answer cannot be used.
    Protocol,
    /// 77: the CA refused (authentication, permission, policy).
    Refused,
    /// 74: storage or key-provider failure.
    Storage,
    /// 70: a bug.
    Internal,
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 64,
            Kind::Config => 78,
            Kind::Temporary => 75,
            Kind::Protocol => 76,
            Kind::Refused => 77,
            Kind::Storage => 74,
            Kind::Internal => 70,
        }
    }

    /// Whether trying the same thing later may succeed without anyone changing anything.
    pub fn is_retryable(self) -> bool {
        self == Kind::Temporary
    }
}

pub struct Error {
    kind: Kind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// The CA's `Retry-After` (seconds) on a temporary failure (HTTP 429/503): `run` waits at
    /// least this long before trying again.
    retry_after: Option<u64>,
    /// What the CA answered, when this error is its answer (kept through [`Error::context`]).
    answer: Option<Box<CaAnswer>>,
}

/// A CA's answer that is an error, as data: the gateway maps it to its own HTTP answer (a vendor
/// refusal → 403 with the vendor's words, unavailable → 503 + Retry-After) without reading the
/// message, and the agent's exit code is the error's [`Kind`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaAnswer {
    /// The HTTP status of the answer (200 for vendors that put errors in a 200 body, as EnOS).
    pub status: u16,
    /// The vendor's own error code (EnOS `code`, Sectigo `code`, Securosys `errorCode`), if any.
    pub code: Option<i64>,
    /// The vendor's words, one sanitized line.
    pub words: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest message one link of an error chain keeps (CA words are already cut to 300 characters
/// by `http::excerpt`; this bounds everything else a CA or a file could make long).
pub const MAX_MESSAGE_CHARS: usize = 2048;

/// Makes text that may come from a CA (or any file or peer) safe for a terminal, a journal line
/// and `state.json`: control characters (C0 including ESC, CR, LF and TAB; DEL; C1) become `\xNN`,
/// Unicode bidi and invisible formatting characters become `\u{NNNN}`, and the text is cut to
/// `max_chars` characters with `…`. Text within the bound may pass through it more than once.
pub fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars));
    for (count, ch) in text.chars().enumerate() {
        if count == max_chars {
            out.push('…');
            break;
        }
        match ch {
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}' => out.push_str(&format!("\\u{{{:04x}}}", ch as u32)),
            c => out.push(c),
        }
    }
    out
}

impl Error {
    /// Every message passes through [`sanitize`]: this is where CA text (EnOS `msg`, EZCA's text,
    /// Sectigo `description`, …) enters the chain that `main` prints and `state.json` records.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        let message = sanitize(&message.into(), MAX_MESSAGE_CHARS);
        Error { kind, message, source: None, retry_after: None, answer: None }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::new(Kind::Config, message)
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Error::new(Kind::Protocol, message)
    }

    pub fn temporary(message: impl Into<String>) -> Self {
        Error::new(Kind::Temporary, message)
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Error::new(Kind::Refused, message)
    }

    pub fn storage(message: impl Into<String>) -> Self {
        Error::new(Kind::Storage, message)
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Wraps this error under a higher-level step; the kind (and so the exit code) is kept.
    pub fn context(self, message: impl Into<String>) -> Self {
        let message = sanitize(&message.into(), MAX_MESSAGE_CHARS);
        let (retry_after, answer) = (self.retry_after, self.answer.clone());
        Error { kind: self.kind, message, source: Some(Box::new(self)), retry_after, answer }
    }

    /// Records the CA's `Retry-After` (kept through [`Error::context`]).
    pub fn with_retry_after(mut self, seconds: Option<u64>) -> Self {
        self.retry_after = seconds;
        self
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// Records what the CA answered (see [`CaAnswer`]).
    pub fn with_answer(mut self, status: u16, code: Option<i64>, words: &str) -> Self {
        let words = sanitize(words, 300);
        self.answer = Some(Box::new(CaAnswer { status, code, words }));
        self
    }

    /// What the CA answered, when this error (or the one it wraps) is the CA's answer.
    pub fn answer(&self) -> Option<&CaAnswer> {
        self.answer.as_deref()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The whole chain on one line, for `state.json` and logs.
    pub fn chain_line(&self) -> String {
        let mut line = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            line.push_str(": ");
            line.push_str(&sanitize(&cause.to_string(), MAX_MESSAGE_CHARS));
            next = cause.source();
        }
        line
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.chain_line())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<enroll_hal::Error> for Error {
    fn from(e: enroll_hal::Error) -> Self {
        // A refused PIN is a configuration fault; retrying it would lock the token.
        let kind = match e {
            enroll_hal::Error::Pin { .. } => Kind::Config,
            // Another run is writing the state directory: try again later (exit 75).
            enroll_hal::Error::Locked { .. } => Kind::Temporary,
            _ => Kind::Storage,
        };
        Error::new(kind, e.to_string()).with_source_of(e)
    }
}

impl Error {
    fn with_source_of(mut self, e: enroll_hal::Error) -> Self {
        // The hal error's own text is already our message; keep only its OS cause.
        if let Some(cause) = std::error::Error::source(&e) {
            self.source = Some(Box::new(SourceText(cause.to_string())));
        }
        self
    }
}

/// A cause kept as text (the original error could not be moved out of its parent).
#[derive(Debug)]
struct SourceText(String);

impl fmt::Display for SourceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceText {}

/// `.context("step")` on results.
pub trait Context<T> {
    fn context(self, message: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.context(message))
    }
}

impl<T> Context<T> for std::result::Result<T, enroll_hal::Error> {
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::from(e).context(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_text_loses_its_control_characters_before_it_reaches_a_terminal() {
        let ca_words =
            "\u{1b}[2J\u{1b}[31mwiped\r\nerror: injected line\u{7}\u{9b}31m \u{202e}gpj.exe\u{2066}";
        let error = Error::refused(format!("EnOS code 99400: {ca_words}"));
        let text = error.to_string();
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        assert_eq!(
            text,
            "EnOS code 99400: \\x1b[2J\\x1b[31mwiped\\x0d\\x0aerror: injected line\\x07\\x9b31m \\u{202e}gpj.exe\\u{2066}"
        );
        assert_eq!(sanitize(&text, MAX_MESSAGE_CHARS), text, "idempotent");
        // Causes that are not our Error (an io::Error with a peer's words) are cleaned in the chain.
        let chained =
            Error::temporary("reading").with_source(std::io::Error::other("bad\u{1b}]0;title\u{7}"));
        assert_eq!(chained.chain_line(), "reading: bad\\x1b]0;title\\x07");
        let long = Error::protocol("x".repeat(10_000)).to_string();
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(sanitize("Ünïcödé text, ok", 100), "Ünïcödé text, ok");
    }
}
