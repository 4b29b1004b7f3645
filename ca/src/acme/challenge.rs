//! Answering authorizations (RFC 8555 §8): http-01 from a listener that lives only while the
//! authorizations are pending, dns-01 through the operator's hook.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::error::{Error, Result};

const WELL_KNOWN: &str = "/.well-known/acme-challenge/";

/// A listener that lives only while authorizations are pending: each connection goes to
/// `serve` on the listener's thread; dropping the responder stops it and closes the port.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    /// `field` names the config field of `listen`, for the error.
    fn start(
        listen: SocketAddr,
        field: &str,
        serve: impl Fn(TcpStream) + Send + 'static,
    ) -> Result<Responder> {
        let listener = TcpListener::bind(listen).map_err(|e| {
            let error = format!("ca.{field}: cannot listen on {listen} for the challenge ({e})");
            match e.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::AddrNotAvailable => {
                    Error::config(error)
                }
                _ => Error::temporary(error),
            }
        })?;
        listener.set_nonblocking(true).map_err(|e| Error::temporary(format!("ca.{field}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                        serve(stream)
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Responder { stop, thread: Some(thread) })
    }

    /// http-01 (RFC 8555 §8.3): `GET /.well-known/acme-challenge/<token>` answers the key
    /// authorization; `answers` maps token → key authorization.
    pub fn http01(listen: SocketAddr, answers: HashMap<String, String>) -> Result<Responder> {
        Responder::start(listen, "http01_listen", move |stream| answer(stream, &answers))
    }

    /// tls-alpn-01 (RFC 8737): a TLS server speaking only `acme-tls/1` that shows, for the name
    /// the validation server asks for (SNI), a self-signed certificate carrying the critical
    /// acmeIdentifier extension; `answers` maps identifier → key authorization.
    #[cfg(feature = "acme-tls-alpn")]
    pub fn tls_alpn01(listen: SocketAddr, answers: &[(Identifier, String)]) -> Result<Responder> {
        let config = Arc::new(super::alpn::server_config(answers)?);
        Responder::start(listen, "tls_alpn01_listen", move |stream| {
            super::alpn::handshake(stream, config.clone())
        })
    }

    /// Not compiled in: the config is refused while parsing, so this is never reached.
    #[cfg(not(feature = "acme-tls-alpn"))]
    pub fn tls_alpn01(_listen: SocketAddr, _answers: &[(Identifier, String)]) -> Result<Responder> {
        Err(super::config::tls_alpn_not_compiled())
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An identifier being validated: a DNS name or an IP address (RFC 8738).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl Identifier {
    pub fn parse(kind: &str, value: &str) -> Option<Identifier> {
        match kind {
            "dns" => Some(Identifier::Dns(value.to_string())),
            "ip" => value.parse().ok().map(Identifier::Ip),
            _ => None,
        }
    }
}

/// One request per connection: the validation server asks once and is answered 200 with the
/// key authorization or 404; anything else it sends is not ours to serve.
fn answer(mut stream: TcpStream, answers: &HashMap<String, String>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let found = target.strip_prefix(WELL_KNOWN).and_then(|token| answers.get(token));
    let response = match (method, found) {
        ("GET", Some(key_authorization)) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{key_authorization}",
            key_authorization.len()
        ),
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
    };
    let _ = stream.write_all(response.as_bytes());
}

/// The TXT record value for a dns-01 key authorization (§8.4).
pub fn dns01_txt(key_authorization: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes()))
}

/// Runs the dns-01 hook once: `ACME_ACTION` = present|cleanup, `ACME_DOMAIN`, `ACME_TXT`.
pub fn run_dns01_hook(hook: &[String], action: &str, domain: &str, txt: &str) -> Result<()> {
    let status = Command::new(&hook[0])
        .args(&hook[1..])
        .env("ACME_ACTION", action)
        .env("ACME_DOMAIN", domain)
        .env("ACME_TXT", txt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::config(format!("ca.dns01_hook: cannot run {}: {e}", hook[0])))?;
    if !status.success() {
        return Err(Error::temporary(format!(
            "ca.dns01_hook: {} for {domain} failed ({status})",
            if action == "present" { "publishing the TXT record" } else { "removing the TXT record" }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: device.example\r\n\r\n").unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_responder_answers_its_tokens_only_and_stops_listening_when_dropped() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Find a free port, then listen on it.
        let port = TcpListener::bind(addr).unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let responder =
            Responder::http01(addr, HashMap::from([("tok".to_string(), "tok.thumb".to_string())])).unwrap();
        let ok = get(addr, "/.well-known/acme-challenge/tok");
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("\r\n\r\ntok.thumb"), "{ok}");
        assert!(get(addr, "/.well-known/acme-challenge/other").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/tok").starts_with("HTTP/1.1 404"));
        drop(responder);
        assert!(TcpStream::connect(addr).is_err(), "nothing listens once the challenge is over");
    }
}
