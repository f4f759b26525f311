//! Keystone v3: how the controller proves who it is, and the service catalog.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

/// How the controller authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No Keystone: send the identity headers keystonemiddleware would have set (a
    /// nova-api without the `authtoken` filter, as in the project's novabed), and
    /// `token` as `X-Auth-Token` (Placement's `noauth2` takes `admin`).
    Headers {
        user_id: String,
        project_id: String,
        roles: String,
        token: String,
    },
    /// Keystone v3.
    Keystone {
        /// e.g. `http://keystone:5000/v3` (a missing `/v3` is added).
        auth_url: String,
        credentials: Credentials,
    },
}

/// Keystone v3 credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Password, scoped to a project.
    Password {
        username: String,
        password: String,
        user_domain: String,
        project_name: String,
        project_domain: String,
    },
    /// An application credential (scoped by itself).
    ApplicationCredential { id: String, secret: String },
}

impl std::fmt::Debug for Auth {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Headers {
                user_id,
                project_id,
                roles,
                ..
            } => write!(
                f,
                "Headers {{ user_id: {user_id}, project_id: {project_id}, roles: {roles} }}"
            ),
            Auth::Keystone {
                auth_url,
                credentials,
            } => match credentials {
                Credentials::Password {
                    username,
                    project_name,
                    ..
                } => write!(
                    f,
                    "Keystone password {{ {auth_url}, user {username}, project {project_name} }}"
                ),
                Credentials::ApplicationCredential { id, .. } => {
                    write!(
                        f,
                        "Keystone application credential {{ {auth_url}, id {id} }}"
                    )
                }
            },
        }
    }
}

/// The `/v3/auth/tokens` URL for an `auth_url` given with or without `/v3`.
pub fn tokens_url(auth_url: &str) -> String {
    let base = auth_url.trim_end_matches('/');
    if base.ends_with("/v3") {
        format!("{base}/auth/tokens")
    } else {
        format!("{base}/v3/auth/tokens")
    }
}

/// The body of `POST /v3/auth/tokens`.
pub fn token_request(c: &Credentials) -> Value {
    match c {
        Credentials::Password {
            username,
            password,
            user_domain,
            project_name,
            project_domain,
        } => json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": username, "domain": {"name": user_domain}, "password": password}}},
            "scope": {"project": {"name": project_name, "domain": {"name": project_domain}}}
        }}),
        Credentials::ApplicationCredential { id, secret } => json!({"auth": {
            "identity": {"methods": ["application_credential"],
                         "application_credential": {"id": id, "secret": secret}}
        }}),
    }
}

/// A token with its catalog.
#[derive(Clone, Debug)]
pub struct Token {
    pub value: String,
    pub expires_at: Option<SystemTime>,
    pub catalog: Vec<CatalogService>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CatalogService {
    #[serde(rename = "type")]
    pub service_type: String,
    #[serde(default)]
    pub endpoints: Vec<CatalogEndpoint>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CatalogEndpoint {
    pub interface: String,
    #[serde(default)]
    pub region_id: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub url: String,
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenInner,
}

#[derive(Deserialize)]
struct TokenInner {
    expires_at: Option<String>,
    #[serde(default)]
    catalog: Vec<CatalogService>,
}

/// Builds the token from Keystone's answer (`X-Subject-Token` header + body).
pub fn parse_token(subject_token: String, body: &[u8]) -> Result<Token, String> {
    let b: TokenBody =
        serde_json::from_slice(body).map_err(|e| format!("unexpected token body: {e}"))?;
    Ok(Token {
        value: subject_token,
        expires_at: b.token.expires_at.as_deref().and_then(parse_rfc3339),
        catalog: b.token.catalog,
    })
}

impl Token {
    /// Renew this long before the token expires, so no request carries a token that
    /// dies in flight.
    pub const RENEW_BEFORE: Duration = Duration::from_secs(120);

    pub fn fresh(&self, now: SystemTime) -> bool {
        match self.expires_at {
            Some(t) => now + Self::RENEW_BEFORE < t,
            None => true,
        }
    }

    /// The endpoint of `service_type` for `interface` (and `region`, if given).
    pub fn endpoint(
        &self,
        service_type: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Option<String> {
        self.catalog
            .iter()
            .filter(|s| s.service_type == service_type)
            .flat_map(|s| s.endpoints.iter())
            .find(|e| {
                e.interface == interface
                    && region.is_none_or(|r| {
                        e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                    })
            })
            .map(|e| e.url.trim_end_matches('/').to_string())
    }
}

/// `2026-11-22T18:47:03.000000Z` (Keystone's format; any offset accepted) → time.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (date, rest) = s.split_once(['T', ' '])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Split off the offset: Z, +hh:mm, -hh:mm, or nothing (UTC).
    let (clock, offset_s) = if let Some(c) = rest.strip_suffix('Z') {
        (c, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (c, o) = rest.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let mut hm = o[1..].split(':').map(|p| p.parse::<i64>().ok());
        let (oh, om) = (hm.next()??, hm.next().flatten().unwrap_or(0));
        (c, sign * (oh * 3600 + om * 60))
    } else {
        (rest, 0)
    };
    let mut t = clock.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next().unwrap_or("0").parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 - offset_s;
    let total = secs as f64 + sec;
    if total < 0.0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keystone_expiry_times_parse_to_the_right_instant() {
        let t = parse_rfc3339("2026-11-22T18:47:03.500000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_795_373_223_500)
        );
        let with_offset = parse_rfc3339("2026-11-22T19:47:03.5+01:00").unwrap();
        assert_eq!(t, with_offset);
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn the_tokens_url_gets_v3_once() {
        assert_eq!(tokens_url("http://k:5000"), "http://k:5000/v3/auth/tokens");
        assert_eq!(
            tokens_url("http://k:5000/v3/"),
            "http://k:5000/v3/auth/tokens"
        );
    }

    #[test]
    fn the_catalog_endpoint_is_chosen_by_type_interface_and_region() {
        let body = br#"{"token": {"expires_at": "2030-01-01T00:00:00Z", "catalog": [
            {"type": "compute", "endpoints": [
                {"interface": "public", "region_id": "r1", "url": "http://pub/v2.1/"},
                {"interface": "internal", "region_id": "r2", "url": "http://int2/v2.1"},
                {"interface": "internal", "region_id": "r1", "url": "http://int1/v2.1"}]},
            {"type": "placement", "endpoints": [
                {"interface": "internal", "region": "r1", "url": "http://place"}]}]}}"#;
        let t = parse_token("tok".into(), body).unwrap();
        assert_eq!(
            t.endpoint("compute", "public", None).as_deref(),
            Some("http://pub/v2.1")
        );
        assert_eq!(
            t.endpoint("compute", "internal", Some("r1")).as_deref(),
            Some("http://int1/v2.1")
        );
        assert_eq!(
            t.endpoint("placement", "internal", Some("r1")).as_deref(),
            Some("http://place")
        );
        assert!(t.endpoint("network", "internal", None).is_none());
        assert!(t.fresh(SystemTime::now()));
    }

    #[test]
    fn secrets_are_not_printed() {
        let a = Auth::Keystone {
            auth_url: "http://k".into(),
            credentials: Credentials::Password {
                username: "defib".into(),
                password: "hunter2".into(),
                user_domain: "Default".into(),
                project_name: "service".into(),
                project_domain: "Default".into(),
            },
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
