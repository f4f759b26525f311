//! `clouds.yaml`, as every OpenStack tool reads it: a cloud by name, from
//! `$OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/clouds.yaml` or
//! `/etc/openstack/clouds.yaml` (the first that exists), with `secure.yaml` beside it
//! merged in (secrets kept apart).
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::keystone::{Auth, Credentials};

/// What a cloud entry gives the session.
#[derive(Debug, Clone, PartialEq)]
pub struct Cloud {
    pub auth: Auth,
    pub region: Option<String>,
    pub interface: Option<String>,
    pub compute_url: Option<String>,
    pub placement_url: Option<String>,
    pub network_url: Option<String>,
}

/// The files searched, in order.
pub fn search_path() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("OS_CLIENT_CONFIG_FILE") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("clouds.yaml"));
    if let Ok(h) = std::env::var("HOME") {
        v.push(Path::new(&h).join(".config/openstack/clouds.yaml"));
    }
    v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    v
}

/// Loads `name` from `file` (or the first file of [`search_path`] that exists).
pub fn load(name: &str, file: Option<&Path>) -> Result<Cloud, String> {
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => search_path()
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "no clouds.yaml found (searched {})",
                    search_path()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut doc: Value =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let secure = path.with_file_name("secure.yaml");
    if secure.exists() {
        let t =
            std::fs::read_to_string(&secure).map_err(|e| format!("{}: {e}", secure.display()))?;
        let s: Value =
            serde_yaml::from_str(&t).map_err(|e| format!("{}: {e}", secure.display()))?;
        merge(&mut doc, s);
    }
    let cloud = doc
        .get("clouds")
        .and_then(|c| c.get(name))
        .ok_or_else(|| format!("{}: no cloud named {name:?}", path.display()))?;
    from_entry(cloud).map_err(|e| format!("{}: cloud {name:?}: {e}", path.display()))
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(|x| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// One `clouds:` entry.
pub fn from_entry(c: &Value) -> Result<Cloud, String> {
    let auth = c.get("auth").ok_or("no `auth` section")?;
    let auth_type = s(c, "auth_type").unwrap_or_else(|| "password".into());
    let auth_url = s(auth, "auth_url").ok_or("no auth.auth_url")?;
    let credentials = match auth_type.as_str() {
        "password" | "v3password" => {
            let username = s(auth, "username").ok_or("no auth.username")?;
            let password = s(auth, "password").ok_or("no auth.password")?;
            let user_domain = s(auth, "user_domain_name")
                .or_else(|| s(auth, "domain_name"))
                .unwrap_or_else(|| "Default".into());
            let project_name = s(auth, "project_name")
                .or_else(|| s(auth, "tenant_name"))
                .ok_or("no auth.project_name")?;
            let project_domain = s(auth, "project_domain_name")
                .or_else(|| s(auth, "domain_name"))
                .unwrap_or_else(|| "Default".into());
            Credentials::Password {
                username,
                password,
                user_domain,
                project_name,
                project_domain,
            }
        }
        "v3applicationcredential" | "applicationcredential" => Credentials::ApplicationCredential {
            id: s(auth, "application_credential_id")
                .ok_or("no auth.application_credential_id (a name needs a user; give the id)")?,
            secret: s(auth, "application_credential_secret")
                .ok_or("no auth.application_credential_secret")?,
        },
        other => {
            return Err(format!(
            "auth_type {other:?} is not supported (password, v3password, v3applicationcredential)"
        ))
        }
    };
    Ok(Cloud {
        auth: Auth::Keystone {
            auth_url,
            credentials,
        },
        region: s(c, "region_name"),
        interface: s(c, "interface"),
        compute_url: s(c, "compute_endpoint_override"),
        placement_url: s(c, "placement_endpoint_override"),
        network_url: s(c, "network_endpoint_override"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_cloud_with_its_secret_in_secure_yaml_loads() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("clouds.yaml"),
            "clouds:\n  prod:\n    region_name: RegionOne\n    interface: internal\n    auth:\n      auth_url: http://k:5000/v3\n      username: defib\n      project_name: service\n      user_domain_name: Default\n      project_domain_name: Default\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("secure.yaml"),
            "clouds:\n  prod:\n    auth:\n      password: s3cret\n",
        )
        .unwrap();
        let c = load("prod", Some(&d.path().join("clouds.yaml"))).unwrap();
        assert_eq!(c.region.as_deref(), Some("RegionOne"));
        assert_eq!(c.interface.as_deref(), Some("internal"));
        match c.auth {
            Auth::Keystone {
                credentials: Credentials::Password { password, .. },
                ..
            } => assert_eq!(password, "s3cret"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_application_credential_cloud_loads() {
        let v: Value = serde_yaml::from_str(
            "auth_type: v3applicationcredential\nauth:\n  auth_url: http://k:5000\n  application_credential_id: abc\n  application_credential_secret: xyz\n",
        )
        .unwrap();
        let c = from_entry(&v).unwrap();
        assert_eq!(
            c.auth,
            Auth::Keystone {
                auth_url: "http://k:5000".into(),
                credentials: Credentials::ApplicationCredential {
                    id: "abc".into(),
                    secret: "xyz".into()
                }
            }
        );
    }

    #[test]
    fn a_missing_cloud_or_field_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("clouds.yaml");
        std::fs::write(&f, "clouds:\n  a:\n    auth:\n      auth_url: http://k\n").unwrap();
        let e = load("b", Some(&f)).unwrap_err();
        assert!(e.contains("no cloud named \"b\""), "{e}");
        let e = load("a", Some(&f)).unwrap_err();
        assert!(e.contains("auth.username"), "{e}");
    }
}
