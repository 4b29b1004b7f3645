//! Where a URL points and the connection to it: TCP with one deadline for the whole exchange,
//! and rustls on top for https:// (the verifier and client identity come from `crate::tls`).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// The parts of an `http://` or `https://` URL a request needs.
#[derive(Debug, PartialEq)]
pub struct Target {
    pub tls: bool,
    /// The host name or IP address (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
    /// The path and query (at least `/`), without a fragment.
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, &'static str> {
        let (tls, rest) = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            _ => return Err("not an http:// or https:// URL"),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("a URL with user information");
        }
        let (host, port) = split_host_port(authority)?;
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the URL has no host, or a host that is not ASCII");
        }
        if path.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err("the URL's path has spaces or non-ASCII characters");
        }
        let path_and_query = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        let port = match port {
            Some(port) => port.parse().map_err(|_| "the URL's port is not a number from 1 to 65535")?,
            None if tls => 443,
            None => 80,
        };
        if port == 0 {
            return Err("the URL's port is not a number from 1 to 65535");
        }
        Ok(Target { tls, host: host.to_string(), port, authority: authority.to_string(), path_and_query })
    }
}

/// `name`, `name:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), &'static str> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an IPv6 address without its closing bracket")?;
        return match after {
            "" => Ok((host, None)),
            _ => after.strip_prefix(':').map(|port| (host, Some(port))).ok_or("junk after an IPv6 address"),
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// A connection whose every read and write must finish before one deadline.
pub enum Connection {
    Plain(Deadlined),
    Tls(Box<StreamOwned<ClientConnection, Deadlined>>),
}

impl Connection {
    /// Resolves the host, connects to the first address that answers and, for https://, sets up
    /// TLS (the handshake happens with the first write).
    pub fn open(target: &Target, tls: &Arc<ClientConfig>, deadline: Instant) -> io::Result<Connection> {
        let tcp = connect(&target.host, target.port, deadline)?;
        let stream = Deadlined { tcp, deadline };
        if !target.tls {
            return Ok(Connection::Plain(stream));
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "the host is not a valid TLS server name")
        })?;
        let session = ClientConnection::new(tls.clone(), name).map_err(io::Error::other)?;
        Ok(Connection::Tls(Box::new(StreamOwned::new(session, stream))))
    }
}

fn connect(host: &str, port: u16, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, remaining(deadline)?) {
            // Whole messages are written at once, so Nagle's algorithm only adds delay: the
            // request after the TLS handshake waited for the server's delayed ACK (about 40 ms).
            Ok(tcp) => return tcp.set_nodelay(true).map(|()| tcp),
            Err(e) => last = io::Error::new(e.kind(), format!("connect to {address}: {e}")),
        }
    }
    Err(last)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
    }
}

/// TCP whose socket timeouts shrink to what is left until the deadline before each call.
pub struct Deadlined {
    tcp: TcpStream,
    deadline: Instant,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(remaining(self.deadline)?))?;
        self.tcp.read(buf).map_err(timed_out)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(remaining(self.deadline)?))?;
        self.tcp.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A socket timeout reads as EAGAIN on Linux; say what it means.
fn timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, "timed out")
        }
        _ => e,
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.read(buf),
            Connection::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.write(buf),
            Connection::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Plain(stream) => stream.flush(),
            Connection::Tls(stream) => stream.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_target() {
        let target = |url| Target::parse(url).unwrap();
        let t = target("https://ca.example/est/simpleenroll");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.authority.as_str()),
            (true, "ca.example", 443, "ca.example")
        );
        assert_eq!(t.path_and_query, "/est/simpleenroll");
        let t = target("http://[::1]:8080?operation=GetCACaps#frag");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.authority.as_str()),
            (false, "::1", 8080, "[::1]:8080")
        );
        assert_eq!(t.path_and_query, "/?operation=GetCACaps");
        assert_eq!(target("HTTPS://10.0.0.1:9443").path_and_query, "/");
        for bad in [
            "ftp://ca.example/",
            "ca.example/path",
            "https://user:pw@ca.example/",
            "https:///path",
            "https://ca.example:0/",
            "https://ca.example:65536/",
            "https://ca.example:x/",
            "https://[::1/",
            "https://[::1]x/",
            "https://ca.example/a b",
            "https://cä.example/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_passed_deadline_is_a_timeout_before_any_connection() {
        let target = Target::parse("http://127.0.0.1:9/").unwrap();
        let tls = ClientConfig::builder_with_provider(Arc::new(crate::tls::device_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let tls = Arc::new(tls);
        let error = Connection::open(&target, &tls, Instant::now()).err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
