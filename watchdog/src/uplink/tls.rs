//! The event stream's TLS client: trusts the CA certificates of `controller.ca_file` and
//! checks the controller's certificate against the address it connects to (or
//! `controller.tls_server_name`).
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How the event stream connects with TLS.
#[derive(Clone)]
pub struct StreamTls {
    connector: TlsConnector,
    /// The name the controller's certificate must carry; `None`: the IP address
    /// connected to.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for StreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl StreamTls {
    /// Trusts the CA certificates in the PEM file `ca_file`; `server_name`: the name the
    /// controller's certificate must carry (empty: the address connected to).
    pub fn new(ca_file: &Path, server_name: &str) -> Result<StreamTls, String> {
        let text = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let certs = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e}", ca_file.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                ca_file.display()
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = if server_name.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(server_name.to_owned())
                    .map_err(|e| format!("{server_name:?}: {e}"))?,
            )
        };
        Ok(StreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The TLS handshake on a connected `tcp` to `addr`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}
