//! HTTP/1.1 messages on one connection (RFC 9112): the request head we write, the response head
//! we read, and the three ways a response body ends (Content-Length, chunked, connection close).
//! Everything here works on any `Read`/`Write`, so it is tested and fuzzed without a socket.
//! One request per connection (`Connection: close`): no pooled connection can go stale between
//! the hours-apart requests of a renewal, and no response can leak into the next request.

use std::io::{self, BufRead, Read, Write};

/// A response head larger than this is refused: real ones are well under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
const MAX_HEADERS: usize = 100;
/// A chunk-size line (hex digits, maybe extensions) or a trailer line longer than this is refused.
const MAX_CHUNK_LINE: usize = 1024;
const HEAD_TOO_LONG: &str = "the response head is larger than 16 KiB";
const CHUNK_LINE_TOO_LONG: &str = "a chunk-size or trailer line is too long";

/// Why a response could not be read.
#[derive(Debug)]
pub enum WireError {
    /// The connection failed or closed (temporary: exit 75).
    Io(io::Error),
    /// The bytes are not an HTTP/1.1 response (protocol: exit 76).
    Malformed(&'static str),
    /// The body is longer than the caller's limit (protocol: exit 76).
    TooLarge,
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

/// The status and header fields of a response.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The first field named `name` (case-insensitive), without surrounding whitespace.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Writes one request. Header names and values come from our code and config, but a CR or LF in
/// one would split the request (header injection), so they are refused here.
pub fn write_request(
    out: &mut impl Write,
    method: &str,
    target: &str,
    authority: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<()> {
    let texts = [method, target, authority].into_iter().chain(headers.iter().flat_map(|(n, v)| [*n, *v]));
    if texts.into_iter().any(|text| text.contains(['\r', '\n'])) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a request header contains a line break"));
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut message = head.into_bytes();
    message.extend_from_slice(body.unwrap_or_default());
    out.write_all(&message)?;
    out.flush()
}

/// Reads the response head, skipping interim (1xx) responses.
pub fn read_head(input: &mut impl BufRead) -> Result<Head, WireError> {
    loop {
        let head = read_one_head(input)?;
        if !(100..200).contains(&head.status) {
            return Ok(head);
        }
    }
}

fn read_one_head(input: &mut impl BufRead) -> Result<Head, WireError> {
    let mut budget = MAX_HEAD_BYTES;
    let status_line = read_line(input, &mut budget, HEAD_TOO_LONG)?
        .ok_or(WireError::Io(io::ErrorKind::UnexpectedEof.into()))?;
    let status = parse_status_line(&status_line)?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(input, &mut budget, HEAD_TOO_LONG)?
            .ok_or(WireError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            return Ok(Head { status, headers });
        }
        if headers.len() == MAX_HEADERS {
            return Err(WireError::Malformed("more than 100 header fields"));
        }
        headers.push(parse_field(&line)?);
    }
}

/// `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Result<u16, WireError> {
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .ok_or(WireError::Malformed("the status line is not HTTP/1.x"))?;
    let code = rest.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    match (code, rest.as_bytes().get(3)) {
        (Some(code), None | Some(b' ')) => match code.parse() {
            // RFC 9110 §15: a status code has three digits and a class from 1 to 5 (we read 6-9
            // as unknown answers, which the backends refuse by class); "0xx" is no code.
            Ok(status) if status >= 100 => Ok(status),
            _ => Err(WireError::Malformed("the status code is below 100")),
        },
        _ => Err(WireError::Malformed("the status line has no three-digit code")),
    }
}

/// `name: value`; obsolete line folding (a line starting with whitespace) is refused (RFC 9112 §5.2).
fn parse_field(line: &str) -> Result<(String, String), WireError> {
    let (name, value) = line.split_once(':').ok_or(WireError::Malformed("a header line has no colon"))?;
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(WireError::Malformed("a header name is not a token"));
    }
    Ok((name.to_string(), value.trim_matches([' ', '\t']).to_string()))
}

/// One line without its CRLF (a bare LF is accepted), counted against `budget`; `None` at a clean
/// end of input before any byte.
fn read_line(
    input: &mut impl BufRead,
    budget: &mut usize,
    too_long: &'static str,
) -> Result<Option<String>, WireError> {
    let mut line = Vec::new();
    let read = input.take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if read > *budget {
        return Err(WireError::Malformed(too_long));
    }
    *budget -= read;
    if line.pop() != Some(b'\n') {
        return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map(Some).map_err(|_| WireError::Malformed("a header line is not text"))
}

/// How the body of a response ends (RFC 9112 §6.3).
#[derive(Debug, PartialEq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

pub fn framing(method: &str, head: &Head) -> Result<Framing, WireError> {
    if method == "HEAD" || head.status == 204 || head.status == 304 {
        return Ok(Framing::Empty);
    }
    if let Some(codings) = head.header("transfer-encoding") {
        return match codings.rsplit(',').next().map(str::trim) {
            Some(last) if last.eq_ignore_ascii_case("chunked") && !codings.contains(',') => {
                Ok(Framing::Chunked)
            }
            _ => Err(WireError::Malformed("a transfer coding other than chunked")),
        };
    }
    let mut lengths = head.all("content-length").flat_map(|v| v.split(',')).map(str::trim);
    let Some(first) = lengths.next() else { return Ok(Framing::UntilClose) };
    if first.is_empty()
        || first.len() > 19
        || !first.bytes().all(|b| b.is_ascii_digit())
        || lengths.any(|l| l != first)
    {
        return Err(WireError::Malformed("a bad Content-Length"));
    }
    Ok(Framing::Length(first.parse().map_err(|_| WireError::Malformed("a bad Content-Length"))?))
}

/// Reads the body, at most `limit` bytes: a longer one is [`WireError::TooLarge`], read no further.
pub fn read_body(input: &mut impl BufRead, framing: Framing, limit: u64) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::new();
    match framing {
        Framing::Empty => {}
        Framing::Length(length) if length > limit => return Err(WireError::TooLarge),
        Framing::Length(length) => read_exactly(input, length, &mut body)?,
        Framing::UntilClose => {
            read_to_close(input, limit, &mut body)?;
            if body.len() as u64 > limit {
                return Err(WireError::TooLarge);
            }
        }
        Framing::Chunked => read_chunked(input, limit, &mut body)?,
    }
    Ok(body)
}

fn read_exactly(input: &mut impl BufRead, length: u64, body: &mut Vec<u8>) -> Result<(), WireError> {
    let read = input.take(length).read_to_end(body)?;
    if (read as u64) < length {
        return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// To the end of the connection. A TLS peer that closes without close_notify ends the body too
/// (many servers do); a cut body then fails in the parser of the CA's format.
fn read_to_close(input: &mut impl BufRead, limit: u64, body: &mut Vec<u8>) -> Result<(), WireError> {
    match input.take(limit + 1).read_to_end(body) {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e.into()),
        _ => Ok(()),
    }
}

fn read_chunked(input: &mut impl BufRead, limit: u64, body: &mut Vec<u8>) -> Result<(), WireError> {
    loop {
        let mut budget = MAX_CHUNK_LINE;
        let line = read_line(input, &mut budget, CHUNK_LINE_TOO_LONG)?
            .ok_or(WireError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        let digits = line.split(';').next().unwrap_or_default().trim_matches([' ', '\t']);
        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WireError::Malformed("a bad chunk size"));
        }
        let size = u64::from_str_radix(digits, 16).map_err(|_| WireError::Malformed("a bad chunk size"))?;
        if size == 0 {
            return skip_trailers(input);
        }
        if body.len() as u64 + size > limit {
            return Err(WireError::TooLarge);
        }
        read_exactly(input, size, body)?;
        let mut end = [0; 2];
        input.read_exact(&mut end)?;
        if &end != b"\r\n" {
            return Err(WireError::Malformed("a chunk does not end with CRLF"));
        }
    }
}

fn skip_trailers(input: &mut impl BufRead) -> Result<(), WireError> {
    let mut budget = MAX_HEAD_BYTES;
    loop {
        match read_line(input, &mut budget, CHUNK_LINE_TOO_LONG)? {
            Some(line) if line.is_empty() => return Ok(()),
            Some(_) => {}
            None => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(text: &str, method: &str, limit: u64) -> Result<(u16, Vec<u8>), WireError> {
        let mut input = text.as_bytes();
        let head = read_head(&mut input)?;
        let body = read_body(&mut input, framing(method, &head)?, limit)?;
        Ok((head.status, body))
    }

    #[test]
    fn the_three_body_framings_and_bodiless_answers() {
        let ok = |text, method| response(text, method, 64).unwrap();
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more", "GET"),
            (200, b"hello".to_vec())
        );
        let chunked = "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(ok(chunked, "POST"), (201, b"hello!".to_vec()));
        assert_eq!(
            ok("HTTP/1.0 200 OK\nContent-Type: text/plain\n\nuntil close", "GET"),
            (200, b"until close".to_vec())
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD"), (200, vec![]));
        assert_eq!(ok("HTTP/1.1 204 No Content\r\n\r\nignored", "POST"), (204, vec![]));
        assert_eq!(
            ok("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok", "POST"),
            (202, b"ok".to_vec())
        );
    }

    #[test]
    fn headers_are_found_case_insensitively_without_whitespace() {
        let head =
            read_head(&mut &b"HTTP/1.1 503 Busy\r\nretry-AFTER:  120 \r\nX-Empty:\r\n\r\n"[..]).unwrap();
        assert_eq!(
            (head.status, head.header("Retry-After"), head.header("x-empty")),
            (503, Some("120"), Some(""))
        );
        assert_eq!(head.header("location"), None);
    }

    #[test]
    fn bodies_over_the_limit_are_refused_before_they_are_read() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n",
        ] {
            let padded = format!("{text}{}", "x".repeat(200));
            let limit = if text.ends_with("40\r\n") { 63 } else { 64 };
            assert!(matches!(response(&padded, "GET", limit), Err(WireError::TooLarge)), "{text:?}");
        }
        assert!(matches!(
            response(&format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(65)), "GET", 64),
            Err(WireError::TooLarge)
        ));
    }

    #[test]
    fn a_cut_answer_is_an_io_error_and_a_garbled_one_is_malformed() {
        for cut in [
            "",
            "HTTP/1.1 200 OK\r\nContent-Le",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ] {
            assert!(matches!(response(cut, "GET", 64), Err(WireError::Io(_))), "{cut:?}");
        }
        for garbled in [
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 093 Odd\r\n\r\n",
            "HTTP/2 200\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\n folded: value\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n",
        ] {
            assert!(matches!(response(garbled, "GET", 64), Err(WireError::Malformed(_))), "{garbled:?}");
        }
        let huge_head = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(response(&huge_head, "GET", 64), Err(WireError::Malformed(HEAD_TOO_LONG))));
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X: 1\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(response(&many, "GET", 64), Err(WireError::Malformed(_))));
    }

    #[test]
    fn the_request_is_one_close_delimited_message_and_refuses_line_breaks() {
        let mut out = Vec::new();
        write_request(&mut out, "POST", "/a?b=c", "ca.example:8443", &[("Content-Type", "x")], Some(b"body"))
            .unwrap();
        let expected = "POST /a?b=c HTTP/1.1\r\nHost: ca.example:8443\r\nConnection: close\r\nContent-Type: x\r\nContent-Length: 4\r\n\r\nbody";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        for headers in [[("X", "a\r\nInjected: 1")], [("X\n", "a")]] {
            let error = write_request(&mut Vec::new(), "GET", "/", "h", &headers, None).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
