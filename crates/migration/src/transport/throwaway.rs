//! Throwaway TLS credentials for `livemig demo --tls` and the tests: a CA, and a certificate
//! and key for each side, signed by it, valid for `localhost` and `127.0.0.1`, for both server
//! and client authentication. Nothing here is for real deployments: the CA's key is written next
//! to the certificates it signs.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// One side's files.
#[derive(Clone, Debug)]
pub struct Side {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and the two sides' credentials it signed.
#[derive(Clone, Debug)]
pub struct Files {
    pub ca: PathBuf,
    pub source: Side,
    pub dest: Side,
}

/// How a leaf certificate is made (tests make broken ones on purpose).
#[derive(Clone, Copy, Debug, Default)]
pub struct Leaf {
    /// Valid only in 2020: long expired.
    pub expired: bool,
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn err(e: rcgen::Error) -> String {
    format!("generating a certificate: {e}")
}

/// A CA in `dir` (`<name>-ca.pem`, its key beside it).
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
    pub pem: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Result<Ca, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("livemig throwaway CA {name}"));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).map_err(err)?;
        let pem = dir.join(format!("{name}-ca.pem"));
        write(&pem, &cert.pem(), 0o644)?;
        write(&dir.join(format!("{name}-ca-key.pem")), &key.serialize_pem(), 0o600)?;
        Ok(Ca { key, cert, pem })
    }

    /// A certificate for `localhost` and `127.0.0.1`, signed by this CA, as `<name>-cert.pem`
    /// and `<name>-key.pem` in `dir`.
    pub fn leaf(&self, dir: &Path, name: &str, how: Leaf) -> Result<Side, String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, format!("livemig {name}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if how.expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).map_err(err)?;
        let side = Side {
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        write(&side.cert, &cert.pem(), 0o644)?;
        write(&side.key, &key.serialize_pem(), 0o600)?;
        Ok(side)
    }
}

/// A fresh CA and both sides' credentials in `dir` (created if missing, readable by its
/// owner only).
pub fn generate(dir: &Path) -> Result<Files, String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = Ca::new(dir, "livemig")?;
    Ok(Files {
        source: ca.leaf(dir, "source", Leaf::default())?,
        dest: ca.leaf(dir, "dest", Leaf::default())?,
        ca: ca.pem,
    })
}
