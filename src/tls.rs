//! TLS on both sides. The listener's certificate comes from PEM files and is swapped without a
//! restart when the files change ([`ServerTls`]); upstream connections verify against the system
//! roots plus an optional CA file per endpoint, or, when an operator says so explicitly, not at
//! all ([`client_config`]).

use crate::config::TlsConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

/// A certificate or key that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    pub path: String,
    pub message: String,
}

fn tls_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// What identifies a version of the two files: modification time and length of each.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(files: &TlsConfig) -> Stamp {
    [&files.cert, &files.key].map(|path| match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    })
}

struct Loaded {
    files: TlsConfig,
    stamp: Stamp,
    config: Arc<rustls::ServerConfig>,
}

/// The listener's TLS settings, replaced whole when the certificate files change.
pub struct ServerTls {
    loaded: RwLock<Loaded>,
}

impl ServerTls {
    /// Loads the certificate chain and key; an unusable pair is an error at start-up.
    pub fn load(files: &TlsConfig) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            loaded: RwLock::new(Loaded {
                files: files.clone(),
                stamp: stamp(files),
                config: server_config(files)?,
            }),
        })
    }

    /// The acceptor for the next connection (the current certificate).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let loaded = self.loaded.read().expect("tls lock poisoned");
        tokio_rustls::TlsAcceptor::from(Arc::clone(&loaded.config))
    }

    /// Loads `files` if they are not the ones in use or have changed since; returns whether a
    /// new certificate is now served. On error the running certificate stays.
    pub fn refresh(&self, files: &TlsConfig) -> Result<bool, TlsError> {
        let now = stamp(files);
        {
            let loaded = self.loaded.read().expect("tls lock poisoned");
            if loaded.files == *files && loaded.stamp == now {
                return Ok(false);
            }
        }
        let config = server_config(files)?;
        *self.loaded.write().expect("tls lock poisoned") = Loaded {
            files: files.clone(),
            stamp: now,
            config,
        };
        tracing::info!(cert = %files.cert.display(), "TLS certificate loaded");
        Ok(true)
    }

    /// Checks the files every `every` and picks up a new certificate (cert-manager, certbot and
    /// friends replace the files in place).
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let files = self.loaded.read().expect("tls lock poisoned").files.clone();
            if let Err(e) = self.refresh(&files) {
                tracing::error!(error = %e, "new TLS certificate refused; the running one stays");
            }
        }
    }
}

fn server_config(files: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| tls_error(&files.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&files.cert, e))?;
    if chain.is_empty() {
        return Err(tls_error(&files.cert, "no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| tls_error(&files.key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&files.cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(&files.key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's trust anchors, read once.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "while reading system CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("no system CA certificates found; HTTPS upstreams need a ca_file");
        }
        tracing::debug!(added, ignored, "system CA certificates");
        roots
    })
}

/// TLS settings for one upstream endpoint: system roots plus `ca_file`, or no verification.
pub fn client_config(
    ca_file: Option<&Path>,
    verify: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(Path::new("<tls>"), e))?;
    if !verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth());
    }
    let mut roots = system_roots().clone();
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_error(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_error(path, e))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(tls_error(path, "no usable CA certificate"));
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any certificate (`tls_verify = false`) but still checks that the peer holds the key
/// of the certificate it showed.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
