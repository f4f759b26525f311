//! The controller's OpenStack client against the novabed's real Keystone 30 (fernet
//! tokens): password, application credential and a clouds.yaml cloud; the compute and
//! placement endpoints come from the token's catalog, and those services validate the
//! token with keystonemiddleware (`cargo xtask novabed start`).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::sync::Arc;

use controller::openstack::compute::Compute;
use controller::openstack::{
    clouds, Auth, Credentials, OsError, RetryPolicy, Session, SessionConfig,
};
use defib_tests::novalab::novabed_dir;
use defib_tests::require;

const KEYSTONE: &str = "http://127.0.0.1:35000/v3";

fn keystone_answers() -> bool {
    std::net::TcpStream::connect("127.0.0.1:35000").is_ok()
        && novabed_dir().join("data/keystone/appcred.json").exists()
}

fn session(auth: Auth) -> Compute {
    let cfg = SessionConfig {
        auth,
        region: Some("RegionOne".into()),
        interface: "internal".into(),
        compute_url: None,
        placement_url: None,
        network_url: None,
        retry: RetryPolicy::default(),
    };
    Compute::new(Arc::new(Session::new(cfg).unwrap()), "2.94")
}

fn password(pw: &str) -> Auth {
    Auth::Keystone {
        auth_url: KEYSTONE.into(),
        credentials: Credentials::Password {
            username: "admin".into(),
            password: pw.into(),
            user_domain: "Default".into(),
            project_name: "admin".into(),
            project_domain: "Default".into(),
        },
    }
}

/// Lists the compute services and reads a host's Placement inventory.
async fn reads_nova_and_placement(c: &Compute) -> Result<(), OsError> {
    let services = c.compute_services(None).await?;
    let hosts: Vec<&str> = services.iter().map(|s| s.host.as_str()).collect();
    for h in ["fake-1", "fake-2", "fake-3"] {
        assert!(hosts.contains(&h), "{hosts:?}");
    }
    let hv = c.hypervisors().await?;
    let (inv, _usage) = c.provider_capacity(&hv[0].id).await?;
    assert!(inv["VCPU"].total > 0 && inv["MEMORY_MB"].total > 0);
    Ok(())
}

#[test]
fn password_application_credential_and_clouds_yaml_authenticate_with_keystone_and_reach_nova_and_placement_through_the_catalog(
) {
    require!(
        keystone_answers(),
        "the novabed with Keystone (cargo xtask novabed start)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        reads_nova_and_placement(&session(password("admin")))
            .await
            .expect("password");

        let ac: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(novabed_dir().join("data/keystone/appcred.json")).unwrap(),
        )
        .unwrap();
        let app = Auth::Keystone {
            auth_url: KEYSTONE.into(),
            credentials: Credentials::ApplicationCredential {
                id: ac["id"].as_str().unwrap().into(),
                secret: ac["secret"].as_str().unwrap().into(),
            },
        };
        reads_nova_and_placement(&session(app))
            .await
            .expect("application credential");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("clouds.yaml");
        std::fs::write(
            &file,
            format!(
                "clouds:\n  lab:\n    region_name: RegionOne\n    interface: internal\n    auth:\n      auth_url: {KEYSTONE}\n      username: admin\n      password: admin\n      project_name: admin\n      user_domain_name: Default\n      project_domain_name: Default\n"
            ),
        )
        .unwrap();
        let cloud = clouds::load("lab", Some(&file)).unwrap();
        reads_nova_and_placement(&session(cloud.auth))
            .await
            .expect("clouds.yaml");

        // A wrong password is a clear authentication error, not a retry loop.
        let err = reads_nova_and_placement(&session(password("wrong")))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OsError::Auth { message, .. } if message.contains("401")),
            "{err}"
        );
    });
}

#[test]
fn a_service_without_a_token_answers_401_and_the_error_says_so() {
    require!(
        keystone_answers(),
        "the novabed with Keystone (cargo xtask novabed start)"
    );
    // The keystone-authenticated nova-api, asked with the header identity (no token):
    // keystonemiddleware refuses it; the client reports the status and Nova's message.
    let cfg = SessionConfig {
        auth: Auth::Headers {
            user_id: "admin".into(),
            project_id: "admin".into(),
            roles: "admin".into(),
            token: "not-a-token".into(),
        },
        region: None,
        interface: "internal".into(),
        compute_url: Some("http://127.0.0.1:38775/v2.1".into()),
        placement_url: Some("http://127.0.0.1:38779".into()),
        network_url: None,
        retry: RetryPolicy::default(),
    };
    let c = Compute::new(Arc::new(Session::new(cfg).unwrap()), "2.94");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(c.compute_services(None)).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
}
