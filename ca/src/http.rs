//! HTTPS with ureq + rustls: one timeout per request, bounded bodies, and the transport failure
//! classes of design.md §7 (unreachable/slow/closed early → 75). Backends decide what an HTTP
//! status means for their CA.

use std::io::Read;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::time::Clock;
use crate::tls::{ClientIdentity, Transport};

/// Larger answers are refused as protocol errors. The largest answer of any backend (a JSON
/// envelope or PEM text with a leaf and its chain) is a few KiB; 64 KiB leaves room for long
/// chains and gateway error pages while keeping a hostile body's memory small.
pub const MAX_BODY_BYTES: u64 = 64 << 10;

/// One client for one CA, with the transport (roots, clock, timeout) it was built from, so a
/// request that needs a client identity gets a sibling with [`Http::with_identity`].
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
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
        let agent = ureq::AgentBuilder::new()
            .tls_config(transport.client_config(identity)?)
            .timeout(Duration::from_secs(transport.timeout_s))
            .redirects(0)
            .user_agent(concat!("enroll-agent/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Http { agent, transport })
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
        let mut request = self.agent.request(method, url);
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(bytes) => request.send_bytes(bytes),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(transport)) => {
                // The query may carry a signature (Redtrust's hmac): keep it out of messages.
                let shown = url.split('?').next().unwrap_or(url);
                return Err(Error::temporary(format!("{what}: {method} {shown}: could not reach the CA"))
                    .with_source(TransportError::from(&transport)));
            }
        };
        // An answer over https:// came through TLS that verified the CA; its Date may vouch for
        // our clock (design.md §5 rule 7). A plain-http lab CA's Date may not.
        self.read(what, response, url.starts_with("https://"), max_body)
    }

    fn read(
        &self,
        what: &str,
        response: ureq::Response,
        authenticated: bool,
        max_body: u64,
    ) -> Result<Response> {
        if let Some(date) = response.header("date").and_then(crate::time::parse_http_date) {
            self.transport.clock.observe_server_date(date, authenticated);
        }
        let status = response.status();
        let content_type = response.header("content-type").map(str::to_string);
        let location = response.header("location").map(str::to_string);
        let retry_after =
            response.header("retry-after").and_then(|text| parse_retry_after(text, self.clock().now()));
        let replay_nonce = response.header("replay-nonce").map(str::to_string);
        let body = read_body(what, response.into_reader(), max_body)?;
        Ok(Response { status, body, content_type, location, retry_after, replay_nonce })
    }
}

/// Reads at most `limit` bytes; a longer body is a protocol error (exit 76), read no further.
fn read_body(what: &str, reader: impl Read, limit: u64) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    reader.take(limit + 1).read_to_end(&mut body).map_err(|e| {
        Error::temporary(format!("{what}: the connection closed before the body was complete")).with_source(e)
    })?;
    if body.len() as u64 > limit {
        return Err(Error::protocol(format!("{what}: the response body is larger than {limit} bytes")));
    }
    Ok(body)
}

/// ureq's transport error without the URL it carries (which may hold a query signature).
#[derive(Debug)]
struct TransportError(String);

impl From<&ureq::Transport> for TransportError {
    fn from(transport: &ureq::Transport) -> Self {
        let mut text = transport.kind().to_string();
        if let Some(message) = transport.message() {
            text.push_str(&format!(": {message}"));
        }
        let mut cause = std::error::Error::source(transport);
        while let Some(inner) = cause {
            text.push_str(&format!(": {inner}"));
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
        let error = read_body("reading", std::io::repeat(b'A'), MAX_BODY_BYTES).unwrap_err();
        assert_eq!(error.kind(), crate::error::Kind::Protocol);
        assert_eq!(error.to_string(), "reading: the response body is larger than 65536 bytes");
        let exact = vec![b'{'; MAX_BODY_BYTES as usize];
        assert_eq!(read_body("reading", &exact[..], MAX_BODY_BYTES).unwrap().len(), exact.len());
    }
}
