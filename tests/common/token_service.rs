//! A token service as Debian's `docker-registry` expects one with `auth.token` (the Docker
//! token flow): on 127.0.0.1, issuing ES256 JWTs signed by a throwaway key whose self-signed
//! certificate the registry trusts (`rootcertbundle`), the certificate named in each token's
//! `x5c` header. One account gets `pull` on any repository; a request without credentials gets
//! a token that grants nothing, and wrong credentials get 401. It records each request's
//! `Authorization`.

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ISSUER: &str = "regmirror-test-token-service";
const SERVICE: &str = "lan-registry";

pub struct TokenService {
    pub addr: SocketAddr,
    /// The certificate the registry trusts for tokens.
    pub certificate: PathBuf,
    /// Each request's `Authorization` header.
    asked: Arc<Mutex<Vec<Option<String>>>>,
    _stop: oneshot::Sender<()>,
}

struct Issuer {
    key: EcdsaKeyPair,
    certificate_der: Vec<u8>,
    /// The `Authorization: Basic ...` of the one account.
    account: String,
    user: String,
}

impl TokenService {
    /// Starts it; the certificate is written to `dir`.
    pub async fn start(dir: &Path, user: &str, password: &str) -> TokenService {
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["token-service".to_string()]).unwrap();
        let certificate = params.self_signed(&key_pair).unwrap();
        let path = dir.join("token-service.pem");
        std::fs::write(&path, certificate.pem()).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let issuer = Arc::new(Issuer {
            key,
            certificate_der: certificate.der().to_vec(),
            account: format!("Basic {basic}"),
            user: user.to_string(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let recorded = Arc::clone(&asked);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let (issuer, recorded) = (Arc::clone(&issuer), Arc::clone(&recorded));
                let service = service_fn(move |req| {
                    let answer = issuer.answer(&req, &recorded);
                    async move { Ok::<_, Infallible>(answer) }
                });
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenService {
            addr,
            certificate: path,
            asked,
            _stop: stop,
        }
    }

    /// The `auth:` section of the registry's configuration.
    pub fn registry_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/auth\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.addr,
            self.certificate.display()
        )
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.asked.lock().unwrap().clone()
    }
}

impl Issuer {
    fn answer(
        &self,
        req: &Request<Incoming>,
        recorded: &Mutex<Vec<Option<String>>>,
    ) -> Response<Full<Bytes>> {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        recorded.lock().unwrap().push(authorization.clone());
        let granted = match authorization.as_deref() {
            Some(a) if a == self.account => true,
            Some(_) => {
                return Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
            None => false,
        };
        let query = req.uri().query().unwrap_or("");
        let scope = query
            .split('&')
            .find_map(|p| p.strip_prefix("scope="))
            .map(|s| s.replace("%3A", ":").replace("%2F", "/"))
            .unwrap_or_default();
        let access: Vec<serde_json::Value> = scope
            .strip_prefix("repository:")
            .and_then(|s| s.rsplit_once(':'))
            .filter(|_| granted)
            .map(|(name, _)| serde_json::json!({"type": "repository", "name": name, "actions": ["pull"]}))
            .into_iter()
            .collect();
        let token = self.token(if granted { &self.user } else { "" }, access);
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    /// A JWT as distribution verifies it: ES256, the signing certificate in `x5c`.
    fn token(&self, subject: &str, access: Vec<serde_json::Value>) -> String {
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let certificate = base64::engine::general_purpose::STANDARD.encode(&self.certificate_der);
        let head = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [certificate]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()),
            "access": access,
        });
        let signed = format!(
            "{}.{}",
            url.encode(head.to_string()),
            url.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", url.encode(signature.as_ref()))
    }
}
