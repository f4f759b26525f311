//! The controller's TLS identity: its PEM certificate chain and key as one rustls `ServerConfig`.
//!
//! Every TLS listener of the controller shares the one configuration: the REST API, and
//! (made for it, not yet wired) the watchdogs' event streams.
//!
//! Nothing here knows about HTTP: [`load_server_config`] gives the configuration,
//! [`accept`] runs one bounded handshake. The crypto provider is ring's, the one
//! reqwest's `rustls-tls` already builds (no aws-lc, no cmake).
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

pub use rustls::ServerConfig;
pub use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake: a slow or silent client
/// cannot hold a connection (and its task) longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of the two files a problem is in (the configuration names its field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

/// A certificate or key that cannot be used, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub file: TlsFile,
    pub message: String,
}

impl TlsError {
    fn new(file: TlsFile, message: impl Into<String>) -> Self {
        TlsError {
            file,
            message: message.into(),
        }
    }
}

/// The crypto provider every TLS endpoint of the controller uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file (the server's own first, then its
/// intermediates).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |m: String| TlsError::new(TlsFile::Cert, format!("{}: {m}", path.display()));
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |m: String| TlsError::new(TlsFile::Key, format!("{}: {m}", path.display()));
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            bad("holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into())
        }
        e => bad(format!("not a PEM private key: {e}")),
    })
}

/// The server configuration from a PEM certificate chain and its private key: TLS 1.2
/// and 1.3, no client certificates. The key must match the chain's first certificate.
pub fn load_server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(TlsFile::Cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            use rustls::Error as E;
            match e {
                E::InvalidCertificate(_) | E::NoCertificatesPresented => TlsError::new(
                    TlsFile::Cert,
                    format!("{}: unusable certificate: {e}", cert_file.display()),
                ),
                E::InconsistentKeys(_) => TlsError::new(
                    TlsFile::Key,
                    format!(
                        "{}: this key does not belong to the certificate in {}",
                        key_file.display(),
                        cert_file.display()
                    ),
                ),
                e => TlsError::new(
                    TlsFile::Key,
                    format!("{}: unusable private key: {e}", key_file.display()),
                ),
            }
        })?;
    Ok(Arc::new(config))
}

/// Why one connection's TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not done within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    TimedOut,
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

/// Runs the server side of one TLS handshake, at most [`HANDSHAKE_TIMEOUT`].
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &TlsAcceptor,
    stream: S,
) -> Result<TlsStream<S>, HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(HandshakeError::Failed(e)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

#[cfg(test)]
pub(crate) mod test_certs {
    //! A CA and a server certificate for `127.0.0.1`/`localhost`, for the TLS tests.
    use std::path::{Path, PathBuf};

    pub struct Files {
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
        pub ca_pem: String,
    }

    /// Writes `ca.pem`, `server.pem` and `server.key` into `dir`.
    pub fn write(dir: &Path) -> Files {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let files = Files {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            ca_pem: ca_cert.pem(),
        };
        std::fs::write(&files.ca, &files.ca_pem).unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_and_key_load_into_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = test_certs::write(dir.path());
        load_server_config(&f.cert, &f.key).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_named_as_the_key_files_problem() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let f = test_certs::write(dir.path());
        let g = test_certs::write(other.path());
        let err = load_server_config(&f.cert, &g.key).unwrap_err();
        assert_eq!(err.file, TlsFile::Key, "{err}");
        assert!(err.message.contains("does not belong"), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_named_with_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let f = test_certs::write(dir.path());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let err = load_server_config(&junk, &f.key).unwrap_err();
        assert_eq!(err.file, TlsFile::Cert);
        assert!(err.message.contains("no PEM certificate"), "{err}");
        let err = load_server_config(&f.cert, &junk).unwrap_err();
        assert_eq!(err.file, TlsFile::Key);
        assert!(err.message.contains("no PEM private key"), "{err}");
        // A certificate file given as the key: no key in it.
        let err = load_server_config(&f.cert, &f.cert).unwrap_err();
        assert_eq!(err.file, TlsFile::Key, "{err}");
    }

    #[test]
    fn a_pem_block_that_is_not_a_certificate_is_the_cert_files_problem() {
        let dir = tempfile::tempdir().unwrap();
        let f = test_certs::write(dir.path());
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_server_config(&bad, &f.key).unwrap_err();
        assert_eq!(err.file, TlsFile::Cert, "{err}");
    }
}
