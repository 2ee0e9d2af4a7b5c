//! HTTPS for the API: the node's certificate (made at `init` or the first start, or one
//! given with `--tls-cert`/`--tls-key`), its fingerprint, and the server config.
//!
//! The certificate is self-signed: a client checks it by its fingerprint (shown by
//! `medmesh status`, as text and as a QR code), or trusts the certificate file itself
//! (the command line does, from the data directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The node's certificate, in the data directory.
pub const CERT_FILE: &str = "api-cert.pem";
/// The certificate's private key, in the data directory (mode 0600).
pub const KEY_FILE: &str = "api-key.pem";

/// Where the API's certificate and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// The node's own certificate in `dir`, made when there is none, for `localhost`, this
/// machine's name and `names` (the `--api-host` names).
pub fn own_certificate(dir: &Path, names: &[String]) -> Result<TlsFiles> {
    let files = TlsFiles {
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let mut subject = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = host_name() {
        subject.push(format!("{host}.local"));
        subject.push(host);
    }
    subject.extend(names.iter().cloned());
    subject.dedup();
    let made =
        rcgen::generate_simple_self_signed(subject).context("cannot make the API's certificate")?;
    // The private key is sealed with the data key (a copy of the directory shows none).
    let pem = made.key_pair.serialize_pem();
    let key_text = match crate::keys::data_key(dir)? {
        Some(key) => crate::keys::seal(key.as_bytes(), pem.as_bytes())?,
        None => pem,
    };
    crate::files::write_private(&files.key, &key_text)?;
    crate::files::write_private(&files.cert, &made.cert.pem())?;
    Ok(files)
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the API's {what} {}", path.display()))
}

/// The SHA-256 fingerprint of the first certificate in a PEM file (`AB:CD:...`).
pub fn fingerprint(cert: &Path) -> Result<String> {
    use rustls::pki_types::pem::PemObject;
    let pem = read_pem(cert, "certificate")?;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .with_context(|| format!("{} holds no certificate", cert.display()))?
        .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
    let digest = Sha256::digest(der.as_ref());
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The rustls server configuration for these files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let cert_pem = read_pem(&files.cert, "certificate")?;
    let mut key_pem = read_pem(&files.key, "key")?;
    if let Ok(text) = std::str::from_utf8(&key_pem)
        && crate::keys::is_sealed(text)
    {
        let dir = files.key.parent().unwrap_or(Path::new("."));
        let data_key = crate::keys::data_key(dir)?.with_context(|| {
            format!(
                "{} is sealed, but its directory has no data key",
                files.key.display()
            )
        })?;
        key_pem = crate::keys::open_sealed(data_key.as_bytes(), text).with_context(|| {
            format!(
                "{} does not open with this node's data key",
                files.key.display()
            )
        })?;
    }
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate", files.cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", files.cert.display());
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{} is not a PEM private key", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the API's certificate {} and key {} do not go together",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_made_certificate_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = own_certificate(dir.path(), &["clinic-laptop.local".into()]).expect("cert");
        let first = fingerprint(&files.cert).expect("fingerprint");
        assert_eq!(first.len(), 32 * 3 - 1);
        server_config(&files).expect("config");
        let again = own_certificate(dir.path(), &[]).expect("again");
        assert_eq!(fingerprint(&again.cert).expect("fingerprint"), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }
}
