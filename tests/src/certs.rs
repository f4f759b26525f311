//! Lab TLS certificates: a throwaway CA and a controller certificate it signs, for the
//! lab's HTTPS API (and any other TLS listener of the lab controllers).
//!
//! [`write_lab_certs`] writes [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] into a
//! directory; the names are stable, so every part of the lab finds them there.
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA certificate (PEM): what clients trust (`defibctl --ca-file`).
pub const CA_FILE: &str = "ca.pem";
/// The server's certificate (PEM): `tls.cert_file`.
pub const CERT_FILE: &str = "server.pem";
/// The server's private key (PEM, PKCS#8, mode 0600): `tls.key_file`.
pub const KEY_FILE: &str = "server.key";

/// Where [`write_lab_certs`] put the files.
#[derive(Debug, Clone)]
pub struct LabCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LabCerts {
    /// The files of a directory [`write_lab_certs`] wrote into.
    pub fn in_dir(dir: &Path) -> LabCerts {
        LabCerts {
            ca: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    /// The controller's `[tls]` section for these files.
    pub fn tls_section(&self) -> String {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            self.cert.display().to_string(),
            self.key.display().to_string()
        )
    }
}

/// Makes a lab CA and a server certificate it signs, valid for `127.0.0.1`,
/// `localhost` and every address of `ips` (e.g. the lab controller's 10.77.x.x
/// addresses), and writes them into `dir` as [`CA_FILE`], [`CERT_FILE`] and
/// [`KEY_FILE`] (the key with mode 0600).
pub fn write_lab_certs(dir: &Path, ips: &[IpAddr]) -> std::io::Result<LabCerts> {
    let fail = |e: rcgen::Error| std::io::Error::other(format!("making lab certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "defib lab CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    names.extend(ips.iter().map(IpAddr::to_string));
    names.dedup();
    let mut params = CertificateParams::new(names).map_err(fail)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "defib lab controller");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(fail)?;
    let cert = params.signed_by(&key, &issuer).map_err(fail)?;

    let files = LabCerts::in_dir(dir);
    std::fs::write(&files.ca, ca_cert.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&files.key)?;
    f.write_all(key.serialize_pem().as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_lab_certificates_load_as_the_controllers_tls_identity_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let ips = ["10.77.0.1".parse().unwrap()];
        let certs = write_lab_certs(dir.path(), &ips).unwrap();
        assert_eq!(certs.ca, dir.path().join("ca.pem"));
        controller::tls::load_server_config(&certs.cert, &certs.key).unwrap();
        let mode = std::fs::metadata(&certs.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(certs.tls_section().starts_with("[tls]\ncert_file = "));
    }
}
