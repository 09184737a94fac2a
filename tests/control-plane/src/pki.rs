//! The certificates and keys a control plane needs: a CA, the API server's serving
//! certificate, an admin client certificate (group system:masters) and the key that
//! signs ServiceAccount tokens.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the files written by [`write`].
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

/// Writes a fresh PKI into `dir`. The serving certificate is valid for localhost, the
/// loopback addresses, the in-cluster names and `extra_ips` (addresses the API server
/// is reached at from elsewhere, such as a lab's).
pub fn write(dir: &Path, extra_ips: &[IpAddr]) -> Result<Pki> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = |name: &str| dir.join(name);
    let pki = Pki {
        ca_cert: file("ca.crt"),
        serving_cert: file("apiserver.crt"),
        serving_key: file("apiserver.key"),
        admin_cert: file("admin.crt"),
        admin_key: file("admin.key"),
        service_account_key: file("sa.key"),
        service_account_pub: file("sa.pub"),
    };

    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("ferrolb-test-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    save(&pki.ca_cert, &ca.pem())?;

    let mut names: Vec<String> = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .map(String::from)
    .to_vec();
    names.extend(["127.0.0.1", "::1"].map(String::from));
    let mut serving = CertificateParams::new(names)?;
    serving
        .subject_alt_names
        .extend(extra_ips.iter().map(|ip| SanType::IpAddress(*ip)));
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    save(&pki.serving_cert, &serving.signed_by(&key, &ca)?.pem())?;
    save(&pki.serving_key, &key.serialize_pem())?;

    let mut admin = CertificateParams::default();
    admin.distinguished_name = name("ferrolb-test-admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    save(&pki.admin_cert, &admin.signed_by(&key, &ca)?.pem())?;
    save(&pki.admin_key, &key.serialize_pem())?;

    // ECDSA P-256: the API server signs tokens with ES256.
    let sa = KeyPair::generate()?;
    save(&pki.service_account_key, &sa.serialize_pem())?;
    save(&pki.service_account_pub, &sa.public_key_pem())?;
    Ok(pki)
}

fn name(common: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

fn save(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}
