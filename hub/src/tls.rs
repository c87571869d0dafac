//! TLS for the hub (rustls, ring provider): a listener that hands axum connections whose
//! handshake finished. Handshakes run in their own tasks with a timeout, so a slow or silent
//! client never stalls the accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::{Error, Result};

/// Longest TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server configuration from PEM files: a certificate chain and its private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let tls = |what: String| {
        move |e: rustls::pki_types::pem::Error| Error::Tls {
            what,
            source: Box::new(e),
        }
    };
    let reading = format!("reading {}", cert.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(tls(reading.clone()))?
        .collect::<std::result::Result<_, _>>()
        .map_err(tls(reading))?;
    if certs.is_empty() {
        return Err(Error::Settings(format!(
            "TLS: {} holds no certificate",
            cert.display()
        )));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(tls(format!("reading {}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls {
        what: "protocol versions".into(),
        source: Box::new(e),
    })?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| Error::Tls {
        what: "certificate and key".into(),
        source: Box::new(e),
    })?;
    Ok(Arc::new(config))
}

/// Accepted TLS connections, handshakes done.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts TCP connections on `listener` and runs their handshakes.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Result<TlsListener> {
        let local = listener
            .local_addr()
            .map_err(Error::io("reading the listening address"))?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, remote)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended: nothing will ever arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
