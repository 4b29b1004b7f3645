//! HTTP/1.1 over rustls: one deadline per request, bounded bodies, and the transport failure
//! classes of design.md §7 (unreachable/slow/closed early → 75, not HTTP → 76). Backends decide
//! what an HTTP status means for their CA. Our own client (`wire`, `connect`) rather than ureq:
//! the requests are few and simple, and it saves about 150 KB of the device binary (issue 13).

pub(crate) mod connect;
pub mod wire;

use std::io::BufReader;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::error::{Error, Result};
use crate::time::Clock;
use crate::tls::{ClientIdentity, Transport};
use connect::{Connection, Target};
use wire::WireError;

/// Larger answers are refused as protocol errors. The largest answer of any backend (a JSON
/// envelope or PEM text with a leaf and its chain) is a few KiB; 64 KiB leaves room for long
/// chains and gateway error pages while keeping a hostile body's memory small.
pub const MAX_BODY_BYTES: u64 = 64 << 10;

/// One client for one CA, with the transport (roots, clock, timeout) it was built from, so a
/// request that needs a client identity gets a sibling with [`Http::with_identity`].
#[derive(Clone)]
pub struct Http {
    tls: Arc<ClientConfig>,
    transport: Transport,
}

/// A complete response.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub location: Option<String>,
    /// `Retry-After` (RFC 9110 §10.2.3) in seconds from now, read from delta-seconds or an HTTP
    /// date when the answer arrived.
    pub retry_after: Option<u64>,
    /// ACME's `Replay-Nonce` (RFC 8555 §6.5), which comes with every answer of an ACME server.
    pub replay_nonce: Option<String>,
}

impl Response {
    /// The body as text, trimmed to one line of at most 300 characters (for error messages that
    /// keep the CA's own words).
    pub fn excerpt(&self) -> String {
        excerpt(&String::from_utf8_lossy(&self.body))
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

pub fn excerpt(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Escapes (ANSI, bidi) in the CA's words must not reach a terminal or journal as such.
    crate::error::sanitize(&line, 300)
}

impl Http {
    /// A client without TLS client authentication.
    pub fn new(transport: Transport) -> Result<Http> {
        Http::build(transport, None)
    }

    /// The same transport, authenticating with `identity` (TLS client authentication is chosen
    /// per request: EST renews with the current key and enrolls with the factory key).
    pub fn with_identity(&self, identity: ClientIdentity) -> Result<Http> {
        Http::build(self.transport.clone(), Some(identity))
    }

    fn build(transport: Transport, identity: Option<ClientIdentity>) -> Result<Http> {
        Ok(Http { tls: transport.client_config(identity)?, transport })
    }

    /// The clock this client's CA answers are judged with (and whose `Date` they feed).
    pub fn clock(&self) -> &Clock {
        &self.transport.clock
    }

    /// The access tokens shared by every client on this transport.
    pub fn tokens(&self) -> &crate::tokens::TokenCache {
        &self.transport.tokens
    }

    /// Sends one request and reads the whole body, at most [`MAX_BODY_BYTES`]. `what` names the
    /// step for errors.
    pub fn send(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response> {
        self.send_bounded(what, method, url, headers, body, MAX_BODY_BYTES)
    }

    /// As [`Http::send`], for an answer that may be longer: at most `max_body` bytes.
    pub fn send_bounded(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        max_body: u64,
    ) -> Result<Response> {
        // The query may carry a signature (Redtrust's hmac): keep it out of messages.
        let shown = url.split('?').next().unwrap_or(url);
        let step = format!("{what}: {method} {shown}");
        let target = Target::parse(url).map_err(|e| Error::protocol(format!("{step}: {e}")))?;
        let unreachable = |e: std::io::Error| {
            Error::temporary(format!("{step}: could not reach the CA")).with_source(TransportError::from(&e))
        };
        let deadline = Instant::now() + Duration::from_secs(self.transport.timeout_s);
        let mut connection =
            BufReader::new(Connection::open(&target, &self.tls, deadline).map_err(unreachable)?);
        let mut all_headers = vec![("User-Agent", concat!("enroll-agent/", env!("CARGO_PKG_VERSION")))];
        all_headers.extend_from_slice(headers);
        wire::write_request(
            connection.get_mut(),
            method,
            &target.path_and_query,
            &target.authority,
            &all_headers,
            body,
        )
        .map_err(unreachable)?;
        let head = wire::read_head(&mut connection).map_err(|e| match e {
            WireError::Io(e) => unreachable(e),
            other => wire_error(&step, other, max_body),
        })?;
        // An answer over https:// came through TLS that verified the CA; its Date may vouch for
        // our clock (design.md §5 rule 7). A plain-http lab CA's Date may not.
        if let Some(date) = head.header("date").and_then(crate::time::parse_http_date) {
            self.transport.clock.observe_server_date(date, target.tls);
        }
        let body = wire::framing(method, &head)
            .and_then(|framing| wire::read_body(&mut connection, framing, max_body))
            .map_err(|e| wire_error(what, e, max_body))?;
        let text = |name: &str| head.header(name).map(str::to_string);
        Ok(Response {
            status: head.status,
            content_type: text("content-type"),
            location: text("location"),
            retry_after: head
                .header("retry-after")
                .and_then(|value| parse_retry_after(value, self.clock().now())),
            replay_nonce: text("replay-nonce"),
            body,
        })
    }
}

fn wire_error(step: &str, error: WireError, max_body: u64) -> Error {
    match error {
        WireError::Io(e) => {
            Error::temporary(format!("{step}: the connection closed before the body was complete"))
                .with_source(e)
        }
        WireError::Malformed(why) => Error::protocol(format!("{step}: the answer is not HTTP/1.1: {why}")),
        WireError::TooLarge => {
            Error::protocol(format!("{step}: the response body is larger than {max_body} bytes"))
        }
    }
}

/// A connection failure with its causes, one line (the URL is not in it).
#[derive(Debug)]
struct TransportError(String);

impl From<&std::io::Error> for TransportError {
    fn from(error: &std::io::Error) -> Self {
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(error);
        while let Some(inner) = cause {
            let next = inner.to_string();
            if !text.ends_with(&next) {
                text.push_str(&format!(": {next}"));
            }
            cause = inner.source();
        }
        TransportError(text)
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

/// The common reading of an HTTP failure status (design.md §7): 408/429/5xx are temporary,
/// other 4xx are refusals. Backends call this after handling their own codes.
pub fn status_error(what: &str, response: &Response) -> Error {
    let words = response.excerpt();
    let message = format!("{what}: HTTP {}: {words}", response.status);
    let error = match response.status {
        408 | 429 | 500..=599 => Error::temporary(message).with_retry_after(response.retry_after),
        400..=499 => Error::refused(message),
        _ => Error::protocol(message),
    };
    error.with_answer(response.status, None, &words)
}

/// `Retry-After` (RFC 9110 §10.2.3): delta-seconds, or an HTTP date counted from `now`. At least
/// one second, so a server saying 0 cannot make us spin.
pub fn parse_retry_after(text: &str, now: u64) -> Option<u64> {
    let text = text.trim();
    let seconds = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        crate::time::parse_http_date(text)?.saturating_sub(now)
    };
    Some(seconds.max(1))
}

/// `base` (no trailing slash) + `path` (with a leading slash).
pub fn join(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

/// RFC 3986 percent-encoding for query values (unreserved characters stay).
pub fn query_escape(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Undoes a query value's escapes: `%XX` (RFC 3986) and form encoding's `+` for a space.
pub fn query_unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/x-www-form-urlencoded` body.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_body_is_a_protocol_error_after_the_limit() {
        let mut endless = std::io::BufReader::new(std::io::repeat(b'A'));
        let error = wire::read_body(&mut endless, wire::Framing::UntilClose, MAX_BODY_BYTES).unwrap_err();
        assert!(matches!(error, WireError::TooLarge), "{error:?}");
        assert_eq!(
            wire_error("reading", error, MAX_BODY_BYTES).to_string(),
            "reading: the response body is larger than 65536 bytes"
        );
        let exact = vec![b'{'; MAX_BODY_BYTES as usize];
        let body = wire::read_body(&mut &exact[..], wire::Framing::UntilClose, MAX_BODY_BYTES).unwrap();
        assert_eq!(body.len(), exact.len());
    }
}
