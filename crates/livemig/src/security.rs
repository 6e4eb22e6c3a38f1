//! The transport options every side takes: TLS credentials or a pre-shared key
//! (`docs/transport.md`). Neither given means plain TCP, as in QEMU.

use anyhow::{anyhow, bail, Result};
use clap::Args;
use migration::{Psk, Security, TlsCreds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `--tls-cert/--tls-key/--tls-ca/--tls-hostname` and `--psk-file`.
#[derive(Args, Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct SecFlags {
    /// This side's certificate (PEM, the chain from the leaf up): with --tls-key and
    /// --tls-ca, every connection runs mutually authenticated TLS 1.3.
    #[arg(long, requires_all = ["tls_key", "tls_ca"], conflicts_with = "psk_file")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that must have signed the peer's certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host in --to).
    #[arg(long, requires = "tls_cert")]
    pub tls_hostname: Option<String>,
    /// A file holding a pre-shared key (at least 32 hex digits, mode 0600): every frame
    /// carries an HMAC-SHA256 under keys derived from it. Both sides need the same file.
    #[arg(long)]
    pub psk_file: Option<PathBuf>,
}

fn absolute(p: &Option<PathBuf>) -> Result<Option<PathBuf>> {
    p.as_ref()
        .map(|p| std::path::absolute(p).map_err(|e| anyhow!("{}: {e}", p.display())))
        .transpose()
}

impl SecFlags {
    /// The same files named absolutely, for a process with another working directory.
    pub fn absolute(&self) -> Result<SecFlags> {
        Ok(SecFlags {
            tls_cert: absolute(&self.tls_cert)?,
            tls_key: absolute(&self.tls_key)?,
            tls_ca: absolute(&self.tls_ca)?,
            tls_hostname: self.tls_hostname.clone(),
            psk_file: absolute(&self.psk_file)?,
        })
    }

    /// Loads what the flags name; an incomplete or contradictory set is an error (the
    /// control socket's `migrate` arguments reach here without clap's checks).
    pub fn load(&self) -> Result<Security> {
        let tls = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        let given = tls.iter().filter(|p| p.is_some()).count();
        match (given, &self.psk_file) {
            (0, None) if self.tls_hostname.is_some() => bail!("tls-hostname needs tls-cert, tls-key and tls-ca"),
            (0, None) => Ok(Security::Plain),
            (0, Some(f)) => Ok(Security::Psk(Arc::new(Psk::load(f).map_err(|e| anyhow!(e))?))),
            (3, None) => {
                let p = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
                let creds = TlsCreds::load(
                    &p(&self.tls_cert),
                    &p(&self.tls_key),
                    &p(&self.tls_ca),
                    self.tls_hostname.clone(),
                )
                .map_err(|e| anyhow!(e))?;
                Ok(Security::Tls(Arc::new(creds)))
            }
            (_, Some(_)) => bail!("choose TLS (tls-cert, tls-key, tls-ca) or a pre-shared key (psk-file), not both"),
            _ => bail!("TLS needs all three of tls-cert, tls-key and tls-ca"),
        }
    }

    /// The destination's transport: `--tls-hostname` names what the source checks.
    pub fn for_destination(&self) -> Result<Security> {
        if self.tls_hostname.is_some() {
            bail!("--tls-hostname is the source's (`livemig migrate`): the destination checks the source's certificate against --tls-ca only");
        }
        self.load()
    }

    /// The flags for a destination child process.
    pub fn cli_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut add = |flag: &str, p: &Option<PathBuf>| {
            if let Some(p) = p {
                a.push(flag.to_string());
                a.push(p.display().to_string());
            }
        };
        add("--tls-cert", &self.tls_cert);
        add("--tls-key", &self.tls_key);
        add("--tls-ca", &self.tls_ca);
        add("--psk-file", &self.psk_file);
        a
    }
}

/// The flags naming one side of a throwaway CA's credentials.
pub fn throwaway_side(side: &migration::transport::throwaway::Side, ca: &Path) -> SecFlags {
    SecFlags {
        tls_cert: Some(side.cert.clone()),
        tls_key: Some(side.key.clone()),
        tls_ca: Some(ca.to_path_buf()),
        ..Default::default()
    }
}
