//! A small blocking client for the controller's REST API.
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Everything that makes `defibctl` exit with 1.
#[derive(Debug)]
pub enum CtlError {
    /// No connection (refused, DNS, timeout, TLS). `ca_file`: whether `--ca-file` was
    /// given (a certificate problem without it says how to give it).
    Unreachable {
        url: String,
        detail: String,
        ca_file: bool,
    },
    /// 401 from the controller.
    TokenRejected { url: String, sent: bool },
    /// Any other 4xx/5xx: the server's `{"error": ...}` text.
    Server { status: u16, message: String },
    /// The answer was not what the API promises.
    BadResponse(String),
    /// Local trouble: token file, writing the output.
    Local(String),
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Unreachable {
                url,
                detail,
                ca_file,
            } => {
                write!(f, "cannot reach the controller at {url}: {detail}")?;
                if detail.contains("certificate") || detail.contains("UnknownIssuer") {
                    if *ca_file {
                        write!(
                            f,
                            " (is --ca-file / DEFIB_CA_FILE the CA that signed its certificate, \
                             and is the URL's host one of the certificate's names?)"
                        )?;
                    } else {
                        write!(
                            f,
                            " (pass --ca-file or set DEFIB_CA_FILE to the PEM file of the CA that \
                             signed its certificate)"
                        )?;
                    }
                }
                Ok(())
            }
            CtlError::TokenRejected { url, sent: true } => write!(
                f,
                "token rejected by the controller at {url} (check --token-file / DEFIB_TOKEN_FILE)"
            ),
            CtlError::TokenRejected { url, sent: false } => write!(
                f,
                "the controller at {url} wants a token: pass --token-file or set DEFIB_TOKEN_FILE"
            ),
            CtlError::Server { status, message } => write!(f, "{message} (HTTP {status})"),
            CtlError::BadResponse(m) | CtlError::Local(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CtlError {}

impl From<std::io::Error> for CtlError {
    fn from(e: std::io::Error) -> Self {
        CtlError::Local(format!("writing output: {e}"))
    }
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Whether `tls` came from a CA file (for the error messages).
    ca_file: bool,
}

impl Client {
    /// A client for the API at `base` (`http://host:port` or `https://host:port`, a
    /// trailing `/` is fine). `tls`: the TLS configuration for https:// ([`Client::trusting`]);
    /// `None`: the public web CAs.
    pub fn new(base: &str, token: Option<String>, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            // The controller waits up to 5 s for the engine to take a command.
            .timeout(Duration::from_secs(15));
        let ca_file = tls.is_some();
        if let Some(tls) = tls {
            agent = agent.tls_config(tls);
        }
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent: agent.build(),
            ca_file,
        }
    }

    /// A TLS configuration that trusts the CA certificates of the PEM file `ca_file`
    /// and nothing else.
    pub fn trusting(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, CtlError> {
        use rustls_pki_types::pem::PemObject;
        let bad = |m: String| CtlError::Local(format!("the CA file {}: {m}", ca_file.display()));
        let text = std::fs::read(ca_file).map_err(|e| {
            CtlError::Local(format!(
                "cannot read the CA file {}: {e}",
                ca_file.display()
            ))
        })?;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Reads the token from `path` (trimmed; an empty file is an error).
    pub fn read_token(path: &Path) -> Result<String, CtlError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CtlError::Local(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(CtlError::Local(format!(
                "the token file {} is empty",
                path.display()
            )));
        }
        Ok(token.to_string())
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`, the body as text.
    pub fn get(&self, path: &str) -> Result<String, CtlError> {
        self.send("GET", path, None)
    }

    pub fn put_json(&self, path: &str, body: serde_json::Value) -> Result<String, CtlError> {
        self.send("PUT", path, Some(body))
    }

    pub fn post(&self, path: &str) -> Result<String, CtlError> {
        self.send("POST", path, None)
    }

    pub fn delete(&self, path: &str) -> Result<String, CtlError> {
        self.send("DELETE", path, None)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => resp
                .into_string()
                .map_err(|e| CtlError::BadResponse(format!("reading the answer from {url}: {e}"))),
            Err(ureq::Error::Status(401, _)) => Err(CtlError::TokenRejected {
                url: self.base.clone(),
                sent: self.token.is_some(),
            }),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                    .unwrap_or_else(|| {
                        let t = text.trim();
                        if t.is_empty() {
                            format!("{method} {path} failed")
                        } else {
                            t.to_string()
                        }
                    });
                Err(CtlError::Server { status, message })
            }
            Err(ureq::Error::Transport(t)) => Err(CtlError::Unreachable {
                url: self.base.clone(),
                detail: transport_detail(&t),
                ca_file: self.ca_file,
            }),
        }
    }
}

/// The most telling part of a transport error ("Connection refused (os error 111)").
fn transport_detail(t: &ureq::Transport) -> String {
    use std::error::Error as _;
    let mut detail = t.message().map(str::to_string);
    let mut source = t.source();
    while let Some(s) = source {
        detail = Some(s.to_string());
        source = s.source();
    }
    detail.unwrap_or_else(|| t.kind().to_string())
}

/// Percent-encodes a path segment (host names, ids).
pub fn segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(segment("compute-1.lab"), "compute-1.lab");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn errors_name_the_url_and_the_token() {
        let e = CtlError::Unreachable {
            url: "http://127.0.0.1:1".into(),
            detail: "Connection refused".into(),
            ca_file: false,
        };
        assert_eq!(
            e.to_string(),
            "cannot reach the controller at http://127.0.0.1:1: Connection refused"
        );
        let e = CtlError::TokenRejected {
            url: "http://c".into(),
            sent: true,
        };
        assert!(e.to_string().starts_with("token rejected"));
        let e = CtlError::Server {
            status: 409,
            message: "h2 is being fenced".into(),
        };
        assert_eq!(e.to_string(), "h2 is being fenced (HTTP 409)");
    }
}
