//! Whole-file tests of the controller's configuration: defaults, the `[controller]`,
//! `[detector]`, `[engine]` and `[nova]` checks, named fields.
use super::*;

/// Writes a secret file (key, token, password) with mode 0600, as the controller needs.
pub(super) fn write_secret(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A config with the cluster key and the API token (the two required secrets), then
/// `extra` (more `[controller]` lines, or sections).
fn with_key(extra: &str) -> (tempfile::TempDir, String) {
    let (dir, text) = with_key_only("");
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef-api-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = format!(
        "{text}api_token_file = {:?}\n{extra}",
        token.display().to_string()
    );
    (dir, text)
}

/// A config with the cluster key only, then `extra`.
fn with_key_only(extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    write_secret(&key, "0123456789abcdef0123456789abcdef\n");
    let text = format!(
        "[controller]\nkey_file = {:?}\n{extra}",
        key.display().to_string()
    );
    (dir, text)
}

fn resolve_err(text: &str) -> String {
    ControllerConfig::parse(text)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string()
}

#[test]
fn a_file_with_only_the_key_and_the_token_gives_the_documented_defaults() {
    let (_d, text) = with_key("");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert_eq!(r.cfg.detector.heartbeat_interval_ms, 100);
    assert_eq!(r.cfg.detector.suspect_after_missed, 3);
    assert_eq!(r.heartbeat_addrs.len(), 1);
    assert_eq!(r.api_token.as_deref(), Some("0123456789abcdef-api-token"));
    assert!(r.tls.is_none(), "plain HTTP without [tls]");
    assert!(!r.cfg.api.insecure_no_token);
}

#[test]
fn a_config_without_a_token_file_and_without_the_insecure_flag_names_the_token_file() {
    let (_d, text) = with_key_only("");
    let err = resolve_err(&text);
    assert!(err.contains("controller.api_token_file"), "{err}");
    assert!(
        err.contains("api.insecure_no_token"),
        "the way out is named: {err}"
    );
}

#[test]
fn the_insecure_flag_serves_the_api_without_a_token() {
    let (_d, text) = with_key_only("[api]\ninsecure_no_token = true\n");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert!(r.api_token.is_none());
    // Even off loopback: the flag is the operator's explicit choice (and logged).
    let (_d, text) =
        with_key_only("api_listen = \"0.0.0.0:7412\"\n[api]\ninsecure_no_token = true\n");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert!(r.api_token.is_none());
}

#[test]
fn a_token_file_and_the_insecure_flag_together_are_refused_naming_the_flag() {
    let (_d, text) = with_key("[api]\ninsecure_no_token = true\n");
    let err = resolve_err(&text);
    assert!(err.contains("api.insecure_no_token"), "{err}");
}

#[test]
fn tls_with_only_one_of_its_files_names_the_missing_one() {
    let (d, text) = with_key("");
    let certs = crate::tls::test_certs::write(d.path());
    let err = resolve_err(&format!("{text}[tls]\ncert_file = {:?}\n", certs.cert));
    assert!(err.contains("tls.key_file"), "{err}");
    let err = resolve_err(&format!("{text}[tls]\nkey_file = {:?}\n", certs.key));
    assert!(err.contains("tls.cert_file"), "{err}");
}

#[test]
fn a_tls_certificate_and_key_load_and_make_the_advertised_api_https() {
    let (d, text) = with_key("");
    let certs = crate::tls::test_certs::write(d.path());
    let text = format!(
        "{text}[tls]\ncert_file = {:?}\nkey_file = {:?}\n[etcd]\nendpoints = [\"10.0.0.1:2379\"]\n",
        certs.cert, certs.key
    );
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert!(r.tls.is_some());
    assert_eq!(r.etcd.unwrap().advertise_api, "https://127.0.0.1:7412");
}

#[test]
fn a_bad_or_missing_certificate_or_key_file_is_named_with_its_field_and_path() {
    let (d, text) = with_key("");
    let certs = crate::tls::test_certs::write(d.path());
    let junk = d.path().join("junk.pem");
    std::fs::write(&junk, "this is not a certificate\n").unwrap();
    let absent = d.path().join("absent.pem");
    for (cert, key, field, named) in [
        (&junk, &certs.key, "tls.cert_file", &junk),
        (&certs.cert, &junk, "tls.key_file", &junk),
        (&absent, &certs.key, "tls.cert_file", &absent),
        // A CA certificate given as the key: no key in it.
        (&certs.cert, &certs.ca, "tls.key_file", &certs.ca),
    ] {
        let err = resolve_err(&format!(
            "{text}[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"
        ));
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains(&named.display().to_string()), "{field}: {err}");
    }
}

#[test]
fn an_unknown_field_is_named() {
    let err = ControllerConfig::parse("[detector]\nheartbeat_intervall_ms = 5\n").unwrap_err();
    assert!(err.to_string().contains("heartbeat_intervall_ms"), "{err}");
}

#[test]
fn a_missing_key_file_names_the_field() {
    let cfg = ControllerConfig::parse("[controller]\nkey_file = \"/nonexistent/key\"\n").unwrap();
    let err = cfg.resolve().unwrap_err();
    assert!(err.to_string().contains("controller.key_file"), "{err}");
}

#[test]
fn the_confirm_retry_is_configurable_and_a_retry_below_the_tick_is_named() {
    let (_d, text) = with_key("[engine]\nconfirm_retry_ms = 500\n");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert_eq!(
        r.cfg.engine_config().confirm_retry,
        Duration::from_millis(500)
    );

    let (_d, text) = with_key("[engine]\ntick_ms = 50\nconfirm_retry_ms = 10\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("engine.confirm_retry_ms"), "{err}");
}

#[test]
fn an_api_on_a_public_address_without_a_token_is_refused() {
    let (_d, text) = with_key_only("api_listen = \"0.0.0.0:7412\"\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(
        err.to_string().contains("controller.api_token_file"),
        "{err}"
    );
}

#[test]
fn a_key_or_api_token_file_open_to_group_or_others_is_refused_naming_the_field_and_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, text) = with_key_only("api_listen = \"0.0.0.0:7412\"\napi_token_file = \"TOKEN\"\n");
    let token = dir.path().join("api.token");
    let text = text.replace("TOKEN", &token.display().to_string());
    write_secret(&token, "an-api-token-0123456789\n");
    ControllerConfig::parse(&text).unwrap().resolve().unwrap();

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("controller.api_token_file"), "{err}");
    assert!(
        err.contains(&format!("{} has mode 0644", token.display())),
        "{err}"
    );
    assert!(err.contains("0600 or 0400"), "{err}");

    std::fs::set_permissions(dir.path().join("k"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("controller.key_file"), "{err}");
    assert!(err.contains("has mode 0640"), "{err}");
}

#[test]
fn the_backend_defaults_to_none_and_libvirt_can_be_chosen() {
    let (_d, text) = with_key("");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert_eq!(r.cfg.controller.backend, Backend::None);
    assert_eq!(
        r.cfg.engine_config().vm_restorer,
        engine::Source::Controller
    );
    let (_d, text) = with_key("backend = \"libvirt\"\n");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert_eq!(r.cfg.controller.backend, Backend::Libvirt);
    // The timeline names who restores VMs.
    assert_eq!(r.cfg.engine_config().vm_restorer, engine::Source::Libvirt);
}

#[test]
fn the_nova_backend_needs_its_auth_and_names_the_missing_field() {
    let (_d, text) = with_key("backend = \"nova\"\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("nova.cloud"), "{err}");
    let (_d, text) =
        with_key("backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("nova.placement_url"), "{err}");
    let (_d, text) = with_key(
        "backend = \"nova\"\n[nova]\nauth = \"password\"\nauth_url = \"http://k\"\nusername = \"u\"\nproject_name = \"p\"\npassword_file = \"/nonexistent\"\n",
    );
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("nova.password_file"), "{err}");
}

#[test]
fn the_nova_backend_with_header_identity_resolves_with_the_documented_defaults() {
    let (_d, text) = with_key(
        "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n/v2.1\"\nplacement_url = \"http://p\"\n",
    );
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    let n = r.nova.unwrap();
    assert_eq!(n.microversion, "2.94");
    assert_eq!(n.settings.max_concurrent_per_target, 10);
    assert_eq!(n.settings.priority_key, "defib:priority");
    let (_d, text) = with_key(
        "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\nplacement_url = \"http://p\"\nmicroversion = \"2.50\"\n",
    );
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("nova.microversion"), "{err}");
}

#[test]
fn the_automatic_unforce_setting_is_the_engines_unfence_policy() {
    let nova = "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\nplacement_url = \"http://p\"\n";
    let (_d, text) = with_key(nova);
    let c = ControllerConfig::parse(&text).unwrap();
    assert!(!c.engine_config().auto_unfence, "operator by default");
    let (_d, text) = with_key(&format!("{nova}unforce = \"automatic\"\n"));
    let c = ControllerConfig::parse(&text).unwrap();
    assert!(c.engine_config().auto_unfence);
}

#[test]
fn an_unknown_backend_is_named() {
    let (_d, text) = with_key("backend = \"xen\"\n");
    let err = ControllerConfig::parse(&text).unwrap_err().to_string();
    assert!(err.contains("xen") && err.contains("backend"), "{err}");
}

#[test]
fn a_bad_listen_address_names_the_field() {
    let (_d, text) = with_key("heartbeat_listen = [\"nowhere\"]\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(
        err.to_string().contains("controller.heartbeat_listen"),
        "{err}"
    );
}

#[test]
fn each_nova_timeout_out_of_range_names_itself() {
    for field in [
        "restore_timeout_s",
        "unforce_timeout_s",
        "request_timeout_s",
    ] {
        let (_d, text) = with_key(&format!(
            "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\nplacement_url = \"http://p\"\n{field} = 0\n",
        ));
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("config field `nova.{field}`: must be at least 1"),
            "{field}"
        );
    }
}

#[test]
fn a_range_message_is_written_from_the_range() {
    let (_d, text) = with_key("[engine]\nmax_dead_share = 0.0\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert_eq!(
        err,
        ConfigError::Invalid {
            field: "engine.max_dead_share".into(),
            message: "must be in (0, 1]".into()
        }
    );
}

#[test]
fn without_etcd_endpoints_the_controller_is_alone_on_sqlite() {
    let (_d, text) = with_key("");
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    assert_eq!(r.etcd, None);
}

#[test]
fn etcd_endpoints_give_several_controllers_with_the_documented_defaults() {
    let (_d, text) = with_key(
        "id = \"c1\"\ncluster_id = \"west\"\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\", \"10.0.0.2:2379\"]\n",
    );
    let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    let e = r.etcd.expect("several controllers");
    assert_eq!(
        e.endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(e.lease_ttl, Duration::from_secs(1));
    assert_eq!(e.stop_margin, Duration::from_millis(250));
    assert_eq!(e.call_timeout, Duration::from_millis(500));
    assert_eq!(e.prefix, "/defib/west/");
    assert_eq!(e.controller_id, "c1");
    assert_eq!(e.advertise_api, "http://127.0.0.1:7412");
}

#[test]
fn each_bad_etcd_field_is_named() {
    for (extra, field) in [
        ("endpoints = [\"https://e:2379\"]", "etcd.endpoints"),
        ("endpoints = [\"e\"]", "etcd.endpoints"),
        ("endpoints = [\"e:1\", \"e:1\"]", "etcd.endpoints"),
        ("endpoints = [\"e:1\"]\nlease_ttl_s = 0", "etcd.lease_ttl_s"),
        (
            "endpoints = [\"e:1\"]\nstop_margin_ms = 600",
            "etcd.stop_margin_ms",
        ),
        (
            "endpoints = [\"e:1\"]\ncall_timeout_ms = 750",
            "etcd.call_timeout_ms",
        ),
        (
            "endpoints = [\"e:1\"]\ncampaign_every_ms = 1",
            "etcd.campaign_every_ms",
        ),
        ("endpoints = [\"e:1\"]\nprefix = \"defib\"", "etcd.prefix"),
    ] {
        let (_d, text) = with_key(&format!("[etcd]\n{extra}\n"));
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains(field), "{extra}: {err}");
    }
}

#[test]
fn closed_incidents_kept_reaches_the_engine_and_too_few_names_the_field() {
    let (_d, text) = with_key("[engine]\nclosed_incidents_kept = 5000\n");
    let r = ControllerConfig::parse(&text).unwrap();
    assert_eq!(r.engine_config().closed_incidents_kept, 5000);
    let (_d, text) = with_key("[engine]\nclosed_incidents_kept = 0\n");
    let err = ControllerConfig::parse(&text)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("engine.closed_incidents_kept"), "{err}");
}
