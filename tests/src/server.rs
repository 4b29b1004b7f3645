//! A minimal blocking HTTPS/1.1 server: std `TcpListener` + rustls `StreamOwned`, one thread
//! per connection, one request per connection (`Connection: close`). Enough for emulating a
//! CA and for misbehaving on purpose (delays, truncated bodies, arbitrary statuses).

use crate::util;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted (a CSR is a few KiB).
const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed HTTP request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Path without the query string, e.g. `/connect-service/v2.0/certificates`.
    pub path: String,
    /// The raw query string (without `?`), as received.
    pub raw_query: String,
    /// Decoded query parameters (`%XX` and `+`), in order of appearance.
    pub query: Vec<(String, String)>,
    /// Headers in order; names as received.
    pub headers: Vec<(String, String)>,
    /// The body bytes exactly as received.
    pub body: Vec<u8>,
    /// The client's TLS certificate (DER), when it sent one.
    pub peer_cert: Option<Vec<u8>>,
}

impl Request {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// First query parameter named `name` (case-sensitive, as EnOS keys are).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A response, plus the misbehaviour to apply while sending it.
#[derive(Clone, Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers (Content-Length and Connection are added by the server, and Date unless
    /// one is given here).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Wait this long before sending anything (client timeouts).
    pub delay: Option<Duration>,
    /// Send only this many body bytes, then close (Content-Length still says the full size).
    pub truncate_body_at: Option<usize>,
}

impl Response {
    /// Empty response with `status`.
    pub fn new(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new(), delay: None, truncate_body_at: None }
    }

    /// JSON body with `Content-Type: application/json;charset=UTF-8` (protocols.md §1.1).
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Self::raw_json(status, v.to_string().into_bytes())
    }

    /// Pre-serialized (possibly deliberately broken) JSON body.
    pub fn raw_json(status: u16, body: Vec<u8>) -> Self {
        Self::new(status).header("Content-Type", "application/json;charset=UTF-8").body(body)
    }

    /// Plain-text body.
    pub fn text(status: u16, s: &str) -> Self {
        Self::new(status).header("Content-Type", "text/plain; charset=utf-8").body(s.as_bytes().to_vec())
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

/// Request handler shared by all connection threads.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Builds the rustls server configuration; with `client_roots`, client certificates are
/// requested (and verified against those roots) but not required.
pub fn tls_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// A running HTTPS server; stops accepting on drop.
pub struct HttpsServer {
    addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpsServer {
    /// Binds 127.0.0.1:`port` (0 = any free port) and serves `handler` on a background thread.
    pub fn start(port: u16, tls: Arc<ServerConfig>, handler: Handler) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("emulator-accept".into())
            .spawn(move || accept_loop(listener, tls, handler, flag))?;
        Ok(Self { addr, shutdown, thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A flag that turns true when the server shuts down (lets delayed responses give up).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        // accept() blocks; a throw-away connection wakes it so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, tls: Arc<ServerConfig>, handler: Handler, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let (tls, handler, stop) = (tls.clone(), handler.clone(), stop.clone());
        let _ = std::thread::Builder::new().name("emulator-conn".into()).spawn(move || {
            let _ = serve_connection(stream, tls, &handler, &stop);
        });
    }
}

fn serve_connection(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    handler: &Handler,
    stop: &AtomicBool,
) -> io::Result<()> {
    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
    tcp.set_write_timeout(Some(READ_TIMEOUT))?;
    let conn = ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    let response = match read_request(&mut stream) {
        Ok(mut req) => {
            req.peer_cert = stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
            handler(&req)
        }
        Err(ReadError::Io(e)) => return Err(e),
        Err(ReadError::Bad(status, why)) => Response::text(status, &why),
    };
    if let Some(d) = response.delay {
        sleep_unless(d, stop);
    }
    write_response(&mut stream, &response)?;
    stream.conn.send_close_notify();
    stream.flush()?;
    let _ = stream.sock.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Sleeps for `d` in small steps, returning early when the server shuts down.
fn sleep_unless(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

enum ReadError {
    Io(io::Error),
    Bad(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn bad(status: u16, why: &str) -> ReadError {
    ReadError::Bad(status, why.to_string())
}

fn read_request<S: Read + Write>(s: &mut S) -> Result<Request, ReadError> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad(431, "request head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad(400, "request head is not UTF-8"))?;
    let mut req = parse_head(head)?;
    if req.header("Expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        // curl waits for this before sending larger bodies.
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        s.flush()?;
    }
    let already = buf[head_end + 4..].to_vec();
    req.body = read_body(s, &req, already)?;
    Ok(req)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &str) -> Result<Request, ReadError> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(505, "only HTTP/1.x is served"));
    }
    let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l.split_once(':').ok_or_else(|| bad(400, "malformed header line"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        raw_query: raw_query.to_string(),
        query: util::parse_form(raw_query),
        headers,
        body: Vec::new(),
        peer_cert: None,
    })
}

fn read_body(s: &mut impl Read, req: &Request, mut body: Vec<u8>) -> Result<Vec<u8>, ReadError> {
    if req.header("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return read_chunked(s, body);
    }
    let len: usize = match req.header("Content-Length") {
        Some(v) => v.parse().map_err(|_| bad(400, "bad Content-Length"))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(bad(413, "request body too large"));
    }
    while body.len() < len {
        let mut chunk = vec![0u8; (len - body.len()).min(16 * 1024)];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(body)
}

/// Decodes a chunked body (trailers ignored).
fn read_chunked(s: &mut impl Read, mut raw: Vec<u8>) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(&raw, b"\r\n") {
                break i;
            }
            fill(s, &mut raw)?;
        };
        let size_str = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad(400, "bad chunk size"))?;
        let size_hex = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad(400, "bad chunk size"))?;
        if out.len() + size > MAX_BODY {
            return Err(bad(413, "request body too large"));
        }
        raw.drain(..line_end + 2);
        if size == 0 {
            return Ok(out);
        }
        while raw.len() < size + 2 {
            fill(s, &mut raw)?;
        }
        out.extend_from_slice(&raw[..size]);
        raw.drain(..size + 2);
    }
}

fn fill(s: &mut impl Read, buf: &mut Vec<u8>) -> Result<(), ReadError> {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk)?;
    if n == 0 || buf.len() > MAX_BODY + MAX_HEAD {
        return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

fn write_response(w: &mut impl Write, r: &Response) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    if !r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("date")) {
        head += &format!("Date: {}\r\n", util::imf_fixdate(SystemTime::now()));
    }
    head += "Server: enroll-tests-ca-emulator\r\nConnection: close\r\n";
    head += &format!("Content-Length: {}\r\n", r.body.len());
    for (k, v) in &r.headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    w.write_all(head.as_bytes())?;
    let n = r.truncate_body_at.unwrap_or(r.body.len()).min(r.body.len());
    w.write_all(&r.body[..n])?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_head_and_query() {
        let r = parse_head("POST /a/b?x=1&y=a%2Bb+c HTTP/1.1\r\nHost: h\r\nContent-Length: 3").ok().unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.query_param("y"), Some("a+b c"));
        assert_eq!(r.header("content-length"), Some("3"));
    }

    #[test]
    fn reads_chunked_body() {
        let mut src: &[u8] = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
        let req =
            Request { headers: vec![("Transfer-Encoding".into(), "chunked".into())], ..Request::default() };
        let body = read_body(&mut src, &req, Vec::new()).ok().unwrap();
        assert_eq!(body, b"Wikipedia");
    }
}
