//! Mutual TLS 1.3 (rustls) for migration connections, with credentials in
//! a directory laid out as QEMU's `tls-creds-x509` expects: `ca-cert.pem`,
//! `server-cert.pem` + `server-key.pem` (the destination, which listens),
//! `client-cert.pem` + `client-key.pem` (the source, which connects).
//! Both sides verify the other against the CA; the source also checks that
//! the destination's certificate names [`DEFAULT_SERVER_NAME`] (or the name
//! it is told). [`generate`] writes a test CA and both certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The name the destination's certificate must carry unless told otherwise.
pub const DEFAULT_SERVER_NAME: &str = "livepage";

/// Why credentials could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source} (make credentials with `livepage tls-creds --out DIR`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file holds no certificate or key in PEM.
    #[error("{path} holds no PEM {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rustls refused the credentials.
    #[error("the TLS credentials in {dir} are not usable: {source}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        source: rustls::Error,
    },
    /// The CA certificate could not be used as a root of trust.
    #[error("{path} is not a usable CA certificate: {why}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The server name is not a valid DNS name or address.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// Making credentials failed.
    #[error("generating credentials failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing credentials failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem {
        path: path.into(),
        what: "private key",
    })
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&path)? {
        roots.add(c).map_err(|e| TlsError::Ca {
            path: path.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listening side's TLS: its certificate, and client certificates
/// required and checked against the CA.
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let cfg_err = |source| TlsError::Config {
        dir: dir.into(),
        source,
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(dir)?),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Ca {
        path: dir.join("ca-cert.pem"),
        why: e.to_string(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&dir.join("server-cert.pem"))?,
            key(&dir.join("server-key.pem"))?,
        )
        .map_err(cfg_err)?;
    // No resumption tickets: every connection authenticates in full.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The connecting side's TLS: its client certificate, and the server's
/// checked against the CA and `server_name`.
pub fn client_config(
    dir: &Path,
    server_name: &str,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), TlsError> {
    let cfg_err = |source| TlsError::Config {
        dir: dir.into(),
        source,
    };
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.into()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(
            certs(&dir.join("client-cert.pem"))?,
            key(&dir.join("client-key.pem"))?,
        )
        .map_err(cfg_err)?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(cfg), name))
}

/// Writes a test CA and a server and a client certificate signed by it
/// into `out` (created): the five files a migration needs. The server
/// certificate names [`DEFAULT_SERVER_NAME`] and `extra_names`.
pub fn generate(out: &Path, extra_names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.into(),
        source,
    })?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "livepage test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let leaf = |names: Vec<String>, cn: &str, eku| -> Result<(String, String), TlsError> {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let mut names = vec![DEFAULT_SERVER_NAME.to_string()];
    names.extend(extra_names.iter().cloned());
    let (server, server_key) = leaf(
        names,
        "livepage destination",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client, client_key) = leaf(
        vec![],
        "livepage source",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let files = [
        ("ca-cert.pem", ca.pem(), false),
        ("server-cert.pem", server, false),
        ("server-key.pem", server_key, true),
        ("client-cert.pem", client, false),
        ("client-key.pem", client_key, true),
    ];
    let mut written = Vec::new();
    for (name, text, secret) in files {
        let path = out.join(name);
        write_file(&path, text.as_bytes(), secret)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_load_on_both_sides() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let files = generate(dir.path(), &["10.0.0.2".into()]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(files.len(), 5);
        server_config(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        client_config(dir.path(), DEFAULT_SERVER_NAME).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(dir.path().join("client-key.pem"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn missing_or_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = server_config(dir.path()).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("ca-cert.pem") && m.contains("tls-creds")),
            "{e:?}"
        );
        generate(dir.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("client-key.pem"), "not a key").unwrap_or(());
        let e = client_config(dir.path(), "livepage")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("client-key.pem")),
            "{e:?}"
        );
    }
}
