//! TLS: for clients (the gRPC API through tonic's rustls support, the HTTP API through a
//! rustls acceptor in front of axum) and mutual TLS between the coordinator and its nodes
//! (nodes require a client certificate signed by their configured CA; the coordinator checks
//! the nodes' certificates against its CA and presents its own). All PEM; ring as the crypto
//! provider.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// A certificate chain and its private key, PEM.
#[derive(Clone, Debug)]
pub struct PemIdentity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl PemIdentity {
    /// Reads both files; errors name the file.
    pub fn read(cert: &Path, key: &Path) -> Result<Self, String> {
        Ok(Self {
            cert: read(cert)?,
            key: read(key)?,
        })
    }

    pub fn tonic(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }
}

/// Reads a PEM file; the error names it.
pub fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// How the coordinator reaches its nodes over mutual TLS.
#[derive(Clone, Debug)]
pub struct NodeTls {
    /// CA that signed the nodes' certificates.
    pub ca: Vec<u8>,
    /// The coordinator's client certificate (nodes that require one refuse calls without).
    pub identity: Option<PemIdentity>,
    /// The name every node certificate must carry, instead of the address dialled (nodes
    /// found by DNS are dialled by pod IP, which certificates rarely name).
    pub domain: Option<String>,
}

impl NodeTls {
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        let mut c =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&self.ca));
        if let Some(id) = &self.identity {
            c = c.identity(id.tonic());
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}

/// The rustls server configuration of an HTTPS listener.
pub fn http_acceptor(id: &PemIdentity) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_slice_iter(&id.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no PEM certificate found".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&id.key).map_err(|e| format!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// An axum listener that accepts TCP (with TCP_NODELAY) and completes TLS handshakes
/// concurrently in the background (a slow or failing client never blocks the others).
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let (sock, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
