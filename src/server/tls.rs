//! Native TLS: the rustls acceptor (ALPN `h2`, then `http/1.1`) and its
//! certificate, which is swapped without a restart when the files change
//! (polled: cert-manager and certbot rewrite files in place) or on SIGHUP.
//!
//! The certificate lives behind a resolver the acceptor asks on every
//! handshake, so a reload changes what new connections get and leaves open
//! ones alone. A new certificate or key that cannot be used (unreadable,
//! not PEM, a key that does not match) keeps the old pair, with an error
//! logged; the key's contents are never part of a message.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// ALPN protocol ids, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate and key pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("{}: no PEM certificate in it ({reason})", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said (markers and positions, no contents).
        reason: String,
    },
    /// The key file holds no private key rustls can read. Deliberately
    /// without the parser's message, which could quote the file.
    #[error("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it", path.display())]
    Key {
        /// The file.
        path: PathBuf,
    },
    /// The key does not belong to the certificate, or is of a kind rustls
    /// cannot sign with.
    #[error("the key in {} does not fit the certificate in {}: {source}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// rustls refused the protocol versions (not expected with its defaults).
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// The pair new handshakes get, replaced whole on reload.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The acceptor and what it needs to reload.
#[derive(Clone)]
pub(super) struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<CurrentCert>,
    provider: Arc<CryptoProvider>,
    files: TlsConfig,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the pair and builds the acceptor; an unusable pair stops
    /// start-up (there is no old one to keep).
    pub(super) fn new(files: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(load(files, &provider)?))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)), current, provider, files: files.clone() })
    }

    /// The acceptor for new connections (it always sees the latest pair).
    pub(super) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the pair; on failure the old one stays.
    fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.files, &self.provider)?;
        self.current.set(Arc::new(key));
        Ok(())
    }

    /// Reloads on SIGHUP and whenever the files' modification time or size
    /// change (checked every `reload_every`), until `stop`.
    pub(super) fn spawn_reload(&self, metrics: Arc<Metrics>, stop: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hangup = hangups();
            let mut seen = tls.fingerprint();
            let every = tls.files.reload_every;
            let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let why = tokio::select! {
                    () = stop.cancelled() => break,
                    Some(()) = next_hangup(&mut hangup) => "SIGHUP",
                    _ = tick.tick(), if every.is_some() => {
                        let now = tls.fingerprint();
                        if now == seen {
                            continue;
                        }
                        "the files changed"
                    }
                };
                // Remembered even when the reload fails: a broken pair is
                // reported once, and retried when the files change again.
                seen = tls.fingerprint();
                match tls.reload() {
                    Ok(()) => {
                        metrics.tls_reload("ok");
                        tracing::info!(cert = %tls.files.cert.display(), reason = why, "TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics.tls_reload("error");
                        tracing::error!(error = %e, reason = why, "TLS certificate not reloaded; the previous one stays in use");
                    }
                }
            }
        });
    }

    /// Modification time and size of both files (`None` where unreadable).
    fn fingerprint(&self) -> [Option<(SystemTime, u64)>; 2] {
        let of = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        [of(&self.files.cert), of(&self.files.key)]
    }
}

/// Reads the chain and key and checks that they belong together.
fn load(files: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source });
    let cert_pem = read(&files.cert)?;
    let certificate = |reason: String| TlsError::Certificate { path: files.cert.clone(), reason };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<_, _>>().map_err(|e| certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(certificate("no CERTIFICATE section".into()));
    }
    let key_pem = crate::secret::Secret::new(read(&files.key)?);
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose()).map_err(|_| TlsError::Key { path: files.key.clone() })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

/// A client config for `tokengate healthcheck` against this server over
/// loopback: it trusts exactly the leaf certificate in `cert` (pinned, not
/// chained to a CA, so a self-signed or private-CA certificate works and
/// no system roots are needed in a minimal image).
pub fn probe_config(cert: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let pem = std::fs::read(cert).map_err(|source| TlsError::Read { path: cert.to_owned(), source })?;
    let certificate = |reason: String| TlsError::Certificate { path: cert.to_owned(), reason };
    let leaf = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| certificate("no CERTIFICATE section".into()))?
        .map_err(|e| certificate(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedLeaf { leaf, provider }))
        .with_no_client_auth();
    Ok(config)
}

/// Accepts the one certificate it was given; handshake signatures are
/// still checked, so the server must hold its key.
#[derive(Debug)]
struct PinnedLeaf {
    leaf: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

/// The SIGHUP listener (none if it cannot be installed: then only polling).
fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are reloaded only when they change");
                None
            }
        }
    }
}

/// The next SIGHUP; never, without a listener.
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    {
        match hangups {
            Some(signal) => signal.recv().await,
            None => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = hangups;
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> TlsConfig {
        let written = std::fs::write(dir.join("cert.pem"), cert).and(std::fs::write(dir.join("key.pem"), key));
        assert!(written.is_ok(), "{written:?}");
        TlsConfig { cert: dir.join("cert.pem"), key: dir.join("key.pem"), reload_every: None }
    }

    #[test]
    fn a_key_file_that_is_not_pem_is_refused_without_quoting_it() {
        let dir = std::env::temp_dir().join(format!("tokengate-tls-unit-{}", std::process::id()));
        assert!(std::fs::create_dir_all(&dir).is_ok());
        let err = Tls::new(&files(&dir, "nothing", "SECRET-KEY-BYTES")).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("no PEM certificate")), "{err:?}");
        let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let err = Tls::new(&files(&dir, cert, "SECRET-KEY-BYTES")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no PEM private key") && !err.contains("SECRET"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
