//! The network side (design.md §9): TLS on `listen` (tokio-rustls; client certificates optional,
//! the chain is handed to the EST handler), plain HTTP on `admin_listen` for `/metrics`,
//! `/healthz` and `/readyz`, the limits, graceful drain and certificate reload.

use crate::config::Settings;
use crate::error::{Error, Kind};
use crate::est::{EstRequest, Gateway, Reply};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::{build_upstream, Upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// What a connection knows about its peer; put into every request's extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certs: Arc<Vec<CertificateDer<'static>>>,
}

/// Builds the TLS server config: the server certificate and key from their files, client
/// certificates optional and, when sent, verified against every label's `ca_certs_file` and
/// factory roots (the handler then checks the chain against the one label asked for).
pub fn load_tls(settings: &Settings) -> Result<Arc<ServerConfig>, Error> {
    let certs = CertificateDer::pem_file_iter(&settings.tls_cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::config(format!("config tls.cert_file: {}: {e}", settings.tls_cert_file.display()))
        })?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "config tls.cert_file: {}: holds no certificate",
            settings.tls_cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.tls_key_file).map_err(|e| {
        Error::config(format!("config tls.key_file: {}: {e}", settings.tls_key_file.display()))
    })?;
    let mut roots = RootCertStore::empty();
    for (name, l) in &settings.labels {
        for c in l.ca_certs.iter().chain(l.factory_roots.iter().flatten()) {
            roots
                .add(c.clone())
                .map_err(|e| Error::config(format!("labels.{name}: a CA certificate is unusable: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::config(format!("client certificate verifier: {e}")))?;
    let verifier = Arc::new(DeferredChainVerifier { inner });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::config(format!("config tls.key_file: does not fit tls.cert_file: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client certificates: rustls's WebPKI verifier, except that a chain it rejects (expired, unknown
/// issuer) is still let through the handshake when the certificate parses. The EST handler
/// verifies every chain again against the one label asked for (`factory_roots_file` or
/// `ca_certs_file`) and answers a rejected one with a 403 naming the reason and an audit row,
/// instead of a bare handshake failure. Proof of possession is unchanged: the handshake
/// signature is verified with the certificate's key by the inner verifier.
#[derive(Debug)]
struct DeferredChainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredChainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => Ok(v),
            Err(e) if webpki::EndEntityCert::try_from(end_entity).is_ok() => {
                log::debug!("client certificate left to the EST handler: {e}");
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Assembles a gateway: settings plus, per label, an upstream (injected, or built from its `ca`).
pub struct ServerBuilder {
    settings: Settings,
    upstreams: HashMap<String, Arc<dyn Upstream>>,
}

/// A running gateway.
pub struct Running {
    pub est_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    settings: Arc<Settings>,
    tls: Arc<RwLock<Arc<ServerConfig>>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    gateway: Arc<Gateway>,
}

impl ServerBuilder {
    pub fn new(settings: Settings) -> Self {
        Self { settings, upstreams: HashMap::new() }
    }

    /// Uses `upstream` for `label` instead of building one from the label's `ca` block.
    pub fn upstream(mut self, label: &str, upstream: Arc<dyn Upstream>) -> Self {
        self.upstreams.insert(label.to_owned(), upstream);
        self
    }

    /// Migrates the database, binds both listeners and starts serving.
    pub async fn start(mut self) -> Result<Running, Error> {
        for (name, l) in &self.settings.labels {
            if !self.upstreams.contains_key(name) {
                let up = build_upstream(name, &l.ca, &self.settings.upstream).map_err(Error::config)?;
                self.upstreams.insert(name.clone(), up);
            }
        }
        let settings = Arc::new(self.settings);
        let tls = Arc::new(RwLock::new(load_tls(&settings)?));
        let store = Store::open(&settings.database).await?;
        store.migrate().await?;
        let metrics = Arc::new(Metrics::new());
        let gateway = Arc::new(Gateway::new(settings.clone(), store, self.upstreams, metrics)?);
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            Error::with_source(Kind::Config, format!("config listen: cannot bind {}", settings.listen), e)
        })?;
        let est_addr = listener.local_addr().map_err(|e| Error::with_source(Kind::Internal, "listen", e))?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(est_loop(
            listener,
            settings.clone(),
            tls.clone(),
            gateway.clone(),
            stop_rx.clone(),
        ))];
        let mut admin_addr = None;
        if let Some(a) = settings.admin_listen {
            let admin = TcpListener::bind(a).await.map_err(|e| {
                Error::with_source(Kind::Config, format!("config admin_listen: cannot bind {a}"), e)
            })?;
            admin_addr =
                Some(admin.local_addr().map_err(|e| Error::with_source(Kind::Internal, "admin_listen", e))?);
            tasks.push(tokio::spawn(admin_loop(admin, gateway.clone(), stop_rx)));
        }
        log::info!("serving EST on {est_addr}, database {}", settings.database.shown());
        Ok(Running { est_addr, admin_addr, settings, tls, stop, tasks, gateway })
    }
}

impl Running {
    /// Re-reads `tls.cert_file` and `tls.key_file` (SIGHUP); new connections use them.
    pub fn reload_tls(&self) -> Result<(), Error> {
        let config = load_tls(&self.settings)?;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = config;
        log::info!("reloaded the TLS certificate and key");
        Ok(())
    }

    pub fn store(&self) -> &Store {
        self.gateway.store()
    }

    /// Stops accepting, lets requests in flight finish (bounded by the request timeout), and
    /// closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.gateway.store().close().await;
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (k, v) in &reply.headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(reply.body))).expect("static header names")
}

async fn est_loop(
    listener: TcpListener,
    settings: Arc<Settings>,
    tls: Arc<RwLock<Arc<ServerConfig>>>,
    gateway: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = settings.limits.clone();
    let timeout = Duration::from_secs(limits.request_timeout_s);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.read().unwrap_or_else(|e| e.into_inner()).clone());
        let gateway = gateway.clone();
        let watcher = graceful.watcher();
        let max_body = limits.max_body_bytes;
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    log::info!("{addr}: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    log::info!("{addr}: TLS handshake timed out");
                    return;
                }
            };
            let certs: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let peer = Peer { addr, certs: Arc::new(certs) };
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(serve_est(&gateway, req, max_body, timeout).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                log::debug!("{addr}: connection: {e}");
            }
        });
    }
    drop(listener);
    // Drain: requests in flight finish; idle keep-alive connections are closed.
    if tokio::time::timeout(timeout + Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        log::warn!("shutdown: connections still open after the drain time, closing them");
    }
}

async fn serve_est(
    gateway: &Gateway,
    req: Request<Incoming>,
    max_body: usize,
    timeout: Duration,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Some(peer) = parts.extensions.get::<Peer>().cloned() else {
        return respond(Reply::text(500, "internal error: no connection facts"));
    };
    let too_large =
        || respond(Reply::text(413, &format!("the request body is larger than {max_body} bytes")));
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        gateway.metrics().request("-", "-", "too-large", 0.0);
        return too_large();
    }
    let body = match tokio::time::timeout(timeout, Limited::new(body, max_body).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                gateway.metrics().request("-", "-", "too-large", 0.0);
                return too_large();
            }
            return respond(Reply::text(400, "the request body could not be read"));
        }
        Err(_) => return respond(Reply::text(408, "the request body did not arrive in time")),
    };
    let authorization = parts.headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let est = EstRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        authorization,
        peer_certs: &peer.certs,
        peer: peer.addr,
        body: &body,
    };
    respond(gateway.handle(&est).await)
}

async fn admin_loop(listener: TcpListener, gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => break,
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(serve_admin(&gateway, req.uri().path()).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn serve_admin(gateway: &Gateway, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => respond(Reply::text(200, "ok")),
        "/readyz" => match gateway.store().ping().await {
            Ok(()) => respond(Reply::text(200, "ready")),
            Err(e) => respond(Reply::text(503, &format!("not ready: {e}"))),
        },
        "/metrics" => {
            if let Ok(n) = gateway.store().pending_count().await {
                gateway.metrics().pending.set(n);
            }
            let mut r = Reply::text(200, "");
            r.headers =
                vec![("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8".into())];
            r.body = gateway.metrics().encode().into_bytes();
            respond(r)
        }
        _ => respond(Reply::text(404, "not found")),
    }
}
