//! A throwaway certificate authority for TLS tests, and an HTTPS client that trusts only it.

use super::Got;
use bytes::Bytes;
use http::{Method, Request, Version};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM files.
pub struct Issued {
    pub ca_pem: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a new CA and server certificate; files named `<prefix>-{ca,cert,key}.pem` in `dir`.
pub fn issue(dir: &Path, prefix: &str) -> Issued {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("regmirror test CA {prefix}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let issued = Issued {
        ca_pem: ca.pem(),
        ca: dir.join(format!("{prefix}-ca.pem")),
        cert: dir.join(format!("{prefix}-cert.pem")),
        key: dir.join(format!("{prefix}-key.pem")),
    };
    std::fs::write(&issued.ca, ca.pem()).unwrap();
    std::fs::write(&issued.cert, leaf.pem()).unwrap();
    std::fs::write(&issued.key, leaf_key.serialize_pem()).unwrap();
    issued
}

/// A TLS client configuration that trusts only `ca_pem`.
fn trusting(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS connection to `localhost` at `addr`, trusting only `ca_pem`, offering no ALPN
/// protocol (HTTP/1.1 follows).
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(trusting(ca_pem)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// One HTTPS request trusting only `ca_pem`; `h2` offers only HTTP/2 by ALPN, else only
/// HTTP/1.1. Returns the HTTP version spoken too.
pub async fn https_request(
    url: &str,
    ca_pem: &str,
    h2: bool,
    headers: &[(&str, &str)],
) -> Result<(Version, Got), String> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(trusting(ca_pem))
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut client = Client::builder(TokioExecutor::new());
    client.http2_only(h2);
    let client = client.build(connector);
    let mut request = Request::builder().method(Method::GET).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok((response.version(), Got::receive(response).await))
}
