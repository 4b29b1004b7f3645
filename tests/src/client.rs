//! A tiny blocking HTTPS client for tests of the emulator itself (the agent has its own).
//! It reads to EOF and reports whether the body matched Content-Length, so truncation
//! faults can be observed rather than hidden.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// A raw response.
#[derive(Clone, Debug)]
pub struct ClientResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes actually received.
    pub body: Vec<u8>,
    /// False when the connection ended before Content-Length bytes arrived.
    pub complete: bool,
}

impl ClientResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body parsed as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A client certificate chain and its PKCS#8 key, for mutual TLS.
pub type Identity =
    (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

/// Sends one request to `base` (`https://127.0.0.1:PORT`) trusting `root_pem`; `target` is the
/// path with query. `timeout` bounds connect, each read and each write.
pub fn request(
    base: &str,
    root_pem: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<ClientResponse> {
    request_with_identity(base, root_pem, None, method, target, headers, body, timeout)
}

/// Like [`request`], presenting `identity` as TLS client certificate when given.
#[allow(clippy::too_many_arguments)]
pub fn request_with_identity(
    base: &str,
    root_pem: &str,
    identity: Option<Identity>,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<ClientResponse> {
    let hostport = base.strip_prefix("https://").ok_or_else(|| io::Error::other("base must be https://"))?;
    let tcp = TcpStream::connect(hostport)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let host = hostport.rsplit_once(':').map(|(h, _)| h).unwrap_or(hostport);
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(io::Error::other)?;
    let conn = rustls::ClientConnection::new(client_config(root_pem, identity)?, server_name)
        .map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify (truncation faults) still gave us data.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&raw)
}

fn client_config(root_pem: &str, identity: Option<Identity>) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(root_pem).map_err(io::Error::other)? {
        roots.add(p.into_contents().into()).map_err(io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((chain, key)) => cfg.with_client_auth_cert(chain, key).map_err(io::Error::other)?,
        None => cfg.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

fn parse_response(raw: &[u8]) -> io::Result<ClientResponse> {
    let end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = raw[end + 4..].to_vec();
    let declared = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let complete = declared.is_none_or(|n| n == body.len());
    Ok(ClientResponse { status, headers, body, complete })
}
