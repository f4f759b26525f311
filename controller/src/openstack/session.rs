//! One authenticated session: tokens, endpoints, microversions, errors, retries.
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;

use super::keystone::{self, Auth, Token};

/// Which API a request is for, with the microversion to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service<'a> {
    /// Nova, e.g. `"2.94"`.
    Compute(&'a str),
    /// Placement, e.g. `"1.39"`.
    Placement(&'a str),
    /// Neutron (no microversions).
    Network,
}

impl Service<'_> {
    fn catalog_type(&self) -> &'static str {
        match self {
            Service::Compute(_) => "compute",
            Service::Placement(_) => "placement",
            Service::Network => "network",
        }
    }
    fn version_header(&self) -> Option<String> {
        match self {
            Service::Compute(v) => Some(format!("compute {v}")),
            Service::Placement(v) => Some(format!("placement {v}")),
            Service::Network => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
    /// Safe to send again after a failure whose effect is unknown.
    fn idempotent(self) -> bool {
        !matches!(self, Method::Post)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OsError {
    /// The API answered with an error status.
    #[error("{method} {url}: HTTP {status}: {message}")]
    Api {
        method: String,
        url: String,
        status: u16,
        message: String,
    },
    /// No answer (connection refused, reset, timed out), after the retries.
    #[error("{method} {url}: {message}")]
    Transport {
        method: String,
        url: String,
        message: String,
    },
    /// Keystone refused or could not be asked.
    #[error("authentication with Keystone at {url}: {message}")]
    Auth { url: String, message: String },
    /// The catalog has no such endpoint.
    #[error("no {service} endpoint (interface {interface}, region {region}) in the Keystone catalog; set it in the config")]
    NoEndpoint {
        service: &'static str,
        interface: String,
        region: String,
    },
    /// The answer was not what the API documents.
    #[error("{method} {url}: unexpected answer: {message}")]
    Decode {
        method: String,
        url: String,
        message: String,
    },
}

impl OsError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            OsError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second try; doubled each time up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Per request.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Everything a session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub auth: Auth,
    /// Catalog region (`None`: any).
    pub region: Option<String>,
    /// Catalog interface: `public`, `internal` or `admin`.
    pub interface: String,
    /// Endpoints used instead of the catalog's (required with [`Auth::Headers`]).
    pub compute_url: Option<String>,
    pub placement_url: Option<String>,
    /// Neutron's endpoint instead of the catalog's (type `network`).
    pub network_url: Option<String>,
    pub retry: RetryPolicy,
}

/// A client session. Cheap to share behind an `Arc`; requests run concurrently.
pub struct Session {
    http: reqwest::Client,
    cfg: SessionConfig,
    token: Mutex<Option<Token>>,
}

/// Statuses worth another try: the request did not run, or the service is briefly away.
fn transient(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

impl Session {
    pub fn new(cfg: SessionConfig) -> Result<Session, OsError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.retry.timeout)
            .connect_timeout(Duration::from_secs(10))
            // Nova answers evacuations and polls in parallel: keep connections warm.
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| OsError::Transport {
                method: "-".into(),
                url: "-".into(),
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(Session {
            http,
            cfg,
            token: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// A fresh token (Keystone only), fetched when there is none, it expires soon, or
    /// `force` (after a 401).
    async fn token(&self, force: bool) -> Result<Option<Token>, OsError> {
        let Auth::Keystone {
            auth_url,
            credentials,
        } = &self.cfg.auth
        else {
            return Ok(None);
        };
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if !force && t.fresh(SystemTime::now()) {
                return Ok(Some(t.clone()));
            }
        }
        let url = keystone::tokens_url(auth_url);
        let body = keystone::token_request(credentials);
        let mut backoff = self.cfg.retry.first_backoff;
        let mut attempt = 1;
        let token = loop {
            let err = match self.http.post(&url).json(&body).send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let subject = resp
                        .headers()
                        .get("x-subject-token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let bytes = resp.bytes().await.unwrap_or_default();
                    match (status, subject) {
                        (201 | 200, Some(s)) => {
                            break keystone::parse_token(s, &bytes).map_err(|message| {
                                OsError::Auth {
                                    url: url.clone(),
                                    message,
                                }
                            })?
                        }
                        (s, _) if transient(s) => format!("HTTP {s}"),
                        (s, _) => {
                            return Err(OsError::Auth {
                                url,
                                message: format!("HTTP {s}: {}", error_message(&bytes)),
                            })
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            if attempt >= self.cfg.retry.attempts {
                return Err(OsError::Auth {
                    url,
                    message: format!("{err} (after {attempt} tries)"),
                });
            }
            tracing::warn!(%url, error = %err, attempt, "Keystone unreachable; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.retry.max_backoff);
            attempt += 1;
        };
        *guard = Some(token.clone());
        Ok(Some(token))
    }

    fn endpoint(&self, service: Service<'_>, token: Option<&Token>) -> Result<String, OsError> {
        let over = match service {
            Service::Compute(_) => &self.cfg.compute_url,
            Service::Placement(_) => &self.cfg.placement_url,
            Service::Network => &self.cfg.network_url,
        };
        if let Some(u) = over {
            return Ok(u.trim_end_matches('/').to_string());
        }
        token
            .and_then(|t| {
                t.endpoint(
                    service.catalog_type(),
                    &self.cfg.interface,
                    self.cfg.region.as_deref(),
                )
            })
            .ok_or_else(|| OsError::NoEndpoint {
                service: service.catalog_type(),
                interface: self.cfg.interface.clone(),
                region: self.cfg.region.clone().unwrap_or_else(|| "any".into()),
            })
    }

    /// Sends a request and decodes the JSON answer (`Value::Null` for an empty body).
    pub async fn request<T: DeserializeOwned>(
        &self,
        service: Service<'_>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, OsError> {
        let bytes = self.request_raw(service, method, path, body).await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| OsError::Decode {
                method: format!("{method:?}").to_uppercase(),
                url: path.into(),
                message: e.to_string(),
            })?
        };
        serde_json::from_value(value).map_err(|e| OsError::Decode {
            method: format!("{method:?}").to_uppercase(),
            url: path.into(),
            message: e.to_string(),
        })
    }

    /// Sends a request; the body of a 2xx answer.
    pub async fn request_raw(
        &self,
        service: Service<'_>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, OsError> {
        let mut token = self.token(false).await?;
        let base = self.endpoint(service, token.as_ref())?;
        let url = format!("{base}{path}");
        let m = format!("{method:?}").to_uppercase();
        let mut backoff = self.cfg.retry.first_backoff;
        let mut attempt = 1;
        let mut reauthed = false;
        loop {
            let mut req = self
                .http
                .request(method.reqwest(), &url)
                .header("Accept", "application/json");
            if let Some(v) = service.version_header() {
                req = req.header("OpenStack-API-Version", v);
            }
            if let Service::Compute(v) = service {
                req = req.header("X-OpenStack-Nova-API-Version", v);
            }
            match (&self.cfg.auth, &token) {
                (_, Some(t)) => req = req.header("X-Auth-Token", &t.value),
                (
                    Auth::Headers {
                        user_id,
                        project_id,
                        roles,
                        token,
                    },
                    None,
                ) => {
                    req = req
                        .header("X-Auth-Token", token)
                        .header("X-User-Id", user_id)
                        .header("X-Project-Id", project_id)
                        .header("X-Roles", roles);
                }
                _ => {}
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let failure = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let bytes = resp.bytes().await.map(|b| b.to_vec());
                    match (status, bytes) {
                        (200..=299, Ok(b)) => return Ok(b),
                        (401, _) if !reauthed && token.is_some() => {
                            // Revoked or expired early: one new token, then once more.
                            reauthed = true;
                            token = self.token(true).await?;
                            continue;
                        }
                        (s, Ok(b)) if transient(s) && (method.idempotent() || s != 504) => {
                            format!("HTTP {s}: {}", error_message(&b))
                        }
                        (s, Ok(b)) => {
                            return Err(OsError::Api {
                                method: m,
                                url,
                                status: s,
                                message: error_message(&b),
                            })
                        }
                        (s, Err(e)) => format!("HTTP {s}, body unreadable: {e}"),
                    }
                }
                // A POST whose connection failed before it was sent did not run; one
                // that timed out may have: not sent again (the caller checks the state).
                Err(e) if method.idempotent() || e.is_connect() => e.to_string(),
                Err(e) => {
                    return Err(OsError::Transport {
                        method: m,
                        url,
                        message: e.to_string(),
                    })
                }
            };
            if attempt >= self.cfg.retry.attempts {
                return Err(OsError::Transport {
                    method: m,
                    url,
                    message: format!("{failure} (after {attempt} tries)"),
                });
            }
            tracing::debug!(%url, error = %failure, attempt, "transient failure; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.retry.max_backoff);
            attempt += 1;
        }
    }
}

/// The human message in an OpenStack error body: Nova `{"badRequest": {"message"}}`,
/// Placement `{"errors": [{"detail"}]}`, Keystone `{"error": {"message"}}`, or the text.
pub fn error_message(body: &[u8]) -> String {
    fn find(v: &Value, depth: u32) -> Option<String> {
        match v {
            Value::Object(m) => {
                for k in ["message", "detail", "title"] {
                    if let Some(Value::String(s)) = m.get(k) {
                        return Some(s.trim().to_string());
                    }
                }
                if depth == 0 {
                    return None;
                }
                m.values().find_map(|v| find(v, depth - 1))
            }
            Value::Array(a) if depth > 0 => a.iter().find_map(|v| find(v, depth - 1)),
            _ => None,
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => find(&v, 3).unwrap_or_else(|| v.to_string()),
        Err(_) => {
            let t = String::from_utf8_lossy(body);
            t.chars().take(300).collect::<String>().trim().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_found_in_each_services_shape() {
        assert_eq!(
            error_message(br#"{"badRequest": {"message": "Invalid input", "code": 400}}"#),
            "Invalid input"
        );
        assert_eq!(
            error_message(br#"{"errors": [{"status": 409, "detail": "conflict here"}]}"#),
            "conflict here"
        );
        assert_eq!(
            error_message(br#"{"error": {"message": "The request you have made requires authentication.", "code": 401}}"#),
            "The request you have made requires authentication."
        );
        assert_eq!(
            error_message(b"<html>502 Bad Gateway</html>"),
            "<html>502 Bad Gateway</html>"
        );
    }
}
