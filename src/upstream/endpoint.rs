//! One upstream endpoint: its HTTP client and timeouts, and what the mirror learns about it as
//! it runs ([`Memory`]: health, rate limits, tokens, whether it refuses manifest HEADs), which
//! a reload keeps while the endpoint's URL and credentials stay the same.
//!
//! Sends one request: authenticates (the Docker token flow or basic credentials), follows
//! redirects with `Authorization` only for the endpoint's own origin, and classifies the answer
//! ([`UpstreamError::from_status`]). Knows nothing of other endpoints or of the cache.

use super::auth::{self, AuthState, Challenge, Credentials, TokenKey};
use super::failure::{Failure, UpstreamError};
use super::health::{Health, ProbeGuard};
use super::request::{Answer, UpstreamRequest};
use crate::config::UpstreamConfig;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// Largest token endpoint answer read.
const MAX_TOKEN_BYTES: usize = 64 * 1024;
const USER_AGENT: &str = concat!("regmirror/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// What the mirror learns about an endpoint while it runs; shared by the configuration
/// generations in which the endpoint keeps its URL and credentials.
pub struct Memory {
    /// The URL this was learnt from.
    url: String,
    /// The TLS settings it was learnt under (a token realm named while certificates went
    /// unchecked must not outlive that).
    tls: (bool, Option<std::path::PathBuf>),
    pub health: Arc<Health>,
    /// Credentials, the last challenge and the tokens.
    pub auth: AuthState,
    /// The endpoint answered a manifest HEAD with 405: its manifest HEADs go as GETs.
    head_refused: AtomicBool,
}

impl Memory {
    /// Whether this memory belongs to an endpoint with this URL, TLS settings and credentials.
    fn is_for(
        &self,
        config: &UpstreamConfig,
        url: &str,
        credentials: Option<&Credentials>,
    ) -> bool {
        let same = |a: &Credentials, b: &Credentials| {
            a.username == b.username && a.password.expose() == b.password.expose()
        };
        self.url == url
            && self.tls == (config.tls_verify, config.ca_file.clone())
            && match (self.auth.credentials.as_ref(), credentials) {
                (None, None) => true,
                (Some(a), Some(b)) => same(a, b),
                _ => false,
            }
    }
}

/// One upstream URL with its client, timeouts and memory.
pub struct Endpoint {
    /// Base URL without a trailing slash, e.g. `https://registry-1.docker.io`.
    pub base: String,
    /// `host[:port]` of the base, the only origin that gets our `Authorization`.
    authority: String,
    /// The base's host without its port: a plain-http endpoint's token service on this host
    /// (any port) may receive the credentials in the clear.
    host: String,
    /// The endpoint is plain http (the operator chose to reach this host without TLS).
    plain_http: bool,
    http: HttpClient,
    pub memory: Arc<Memory>,
    connect_timeout: Duration,
    response_timeout: Duration,
    pub stall_timeout: Duration,
    /// May say what a tag points to.
    pub resolve_tags: bool,
}

impl Endpoint {
    /// Builds the endpoint, taking over `known` memory when it is this endpoint's.
    pub fn new(config: &UpstreamConfig, known: &[Arc<Memory>]) -> Result<Endpoint, String> {
        let base = config.url.trim_end_matches('/').to_string();
        let uri = base.parse::<Uri>().ok();
        let authority = uri
            .as_ref()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let host = uri
            .as_ref()
            .and_then(|u| u.host().map(str::to_string))
            .unwrap_or_default();
        let plain_http = uri.as_ref().and_then(|u| u.scheme_str()) == Some("http");
        let credentials = match (&config.username, &config.password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        if !config.tls_verify {
            tracing::warn!(
                upstream = %base,
                "TLS CERTIFICATE VERIFICATION IS OFF for this upstream (tls_verify = false): anyone on the path can impersonate it; tags it resolves cannot be trusted"
            );
        }
        let tls = crate::tls::client_config(config.ca_file.as_deref(), config.tls_verify)
            .map_err(|e| format!("upstream {base}: ca_file {e}"))?;
        let memory = known
            .iter()
            .find(|m| m.is_for(config, &base, credentials.as_ref()))
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Memory {
                    url: base.clone(),
                    tls: (config.tls_verify, config.ca_file.clone()),
                    health: Arc::default(),
                    auth: AuthState::new(credentials),
                    head_refused: AtomicBool::new(false),
                })
            });
        Ok(Endpoint {
            base,
            authority,
            host,
            plain_http,
            http: http_client(config.connect_timeout, tls),
            memory,
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            stall_timeout: config.stall_timeout,
            resolve_tags: config.resolve_tags,
        })
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.memory.health
    }

    /// About the longest one try of this endpoint takes (connections, a token, the request
    /// and a retry after a challenge or a 405, a manifest's body): how long a request waits
    /// for another's probe.
    pub fn patience(&self) -> Duration {
        2 * self.connect_timeout + 4 * self.response_timeout + self.stall_timeout
    }

    /// Probes the endpoint in the background with `GET /v2/` (any answer but a 5xx shows it is
    /// there), holding `probe` until the outcome is recorded: for a request that answers
    /// without upstream meanwhile (a tag's last known digest).
    pub fn probe_in_background(&self, probe: ProbeGuard, longest_back_off: Duration) {
        let (http, memory) = (self.http.clone(), Arc::clone(&self.memory));
        let (base, timeout) = (self.base.clone(), self.response_timeout);
        tokio::spawn(async move {
            let url = format!("{base}/v2/");
            let request = Request::get(url.as_str())
                .header(header::USER_AGENT, USER_AGENT)
                .body(Empty::new());
            let Ok(request) = request else { return };
            let failed = match tokio::time::timeout(timeout, http.request(request)).await {
                Ok(Ok(r)) if !r.status().is_server_error() => None,
                Ok(Ok(r)) => Some(format!("{url} answered {}", r.status())),
                Ok(Err(e)) => Some(format!("{base}: {}", error_chain(&e))),
                Err(_) => Some(format!("{base} did not answer within {timeout:?}")),
            };
            match failed {
                None => {
                    memory.health.mark_up();
                    tracing::info!(endpoint = %base, "upstream endpoint answers again");
                }
                Some(error) => {
                    let now = tokio::time::Instant::now();
                    let pause = memory.health.mark_down(now, longest_back_off, true, &error);
                    tracing::warn!(endpoint = %base, %error, back_off_ms = pause.as_millis() as u64, "upstream endpoint still down");
                }
            }
            probe.answered();
        });
    }

    /// Whether a manifest HEAD goes to this endpoint as a GET (it refused HEAD before), which
    /// counts as a pull on registries that count them.
    pub fn sends_head_as_get(&self, request: &UpstreamRequest<'_>) -> bool {
        request.is_manifest_head() && self.memory.head_refused.load(Ordering::Relaxed)
    }

    /// Sends `request` and classifies the answer: a 2xx is an [`Answer`], anything else an
    /// error of its class. A manifest HEAD refused with 405 is asked again as a GET, and so are
    /// this endpoint's manifest HEADs from then on.
    pub async fn fetch(&self, request: &UpstreamRequest<'_>) -> Result<Answer, UpstreamError> {
        let as_get = self.sends_head_as_get(request);
        let method = if as_get {
            Method::GET
        } else {
            request.method.clone()
        };
        let mut response = self.exchange(request, &method).await?;
        if response.status() == StatusCode::METHOD_NOT_ALLOWED
            && request.is_manifest_head()
            && !as_get
        {
            self.memory.head_refused.store(true, Ordering::Relaxed);
            tracing::info!(endpoint = %self.base, "upstream refuses manifest HEAD (405); asking it with GET instead from now on");
            response = self.exchange(request, &Method::GET).await?;
        }
        self.classify(response)
    }

    /// One authenticated exchange: the request with what the endpoint's last challenge asks
    /// for, and once more after a new challenge.
    async fn exchange(
        &self,
        request: &UpstreamRequest<'_>,
        method: &Method,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let scope = format!("repository:{}:pull", request.repo.as_str());
        let url = format!(
            "{}/v2/{}/{}",
            self.base,
            request.repo.as_str(),
            request.rest
        );
        let accept = request.accept;
        let range = request.range_from.map(|n| format!("bytes={n}-"));
        let range = range.as_deref();
        let auth = &self.memory.auth;
        let mut used_token = None;
        let mut authorization = match auth.known_challenge() {
            Some(challenge) => {
                self.authorization(&challenge, &scope, &mut used_token)
                    .await?
            }
            None => None,
        };
        let mut response = self
            .send(method, &url, accept, range, authorization.as_deref())
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            if let Some(challenge) = challenge_of(&response) {
                if let Some(key) = used_token.take() {
                    auth.forget(&key).await;
                }
                auth.remember(challenge.clone());
                // Tokens are keyed by the scope this request needs (the one Docker Hub's
                // challenge names too), so the preemptive path finds them again.
                authorization = self
                    .authorization(&challenge, &scope, &mut used_token)
                    .await?;
                if authorization.is_some() {
                    response = self
                        .send(method, &url, accept, range, authorization.as_deref())
                        .await?;
                }
            }
        }
        self.memory.health.observe(response.headers());
        Ok(response)
    }

    /// Whether `uri` is this endpoint's own origin (scheme, host and port): the only place its
    /// `Authorization` goes (an https endpoint redirecting to plain http of the same host gets
    /// none).
    fn is_own(&self, uri: &Uri) -> bool {
        let scheme = self.base.split("://").next().unwrap_or("");
        uri.scheme_str() == Some(scheme)
            && uri.authority().map(|a| a.as_str()) == Some(self.authority.as_str())
    }

    /// Whether the credentials may go to a token service at `realm`: over https, or in the
    /// clear to this plain-http endpoint's own host on any port (a LAN registry on :5000 with
    /// its token service on :5001; the operator already chose plain http to that host).
    fn may_send_credentials_to(&self, realm: &Uri) -> bool {
        match realm.scheme_str() {
            Some("https") => true,
            Some("http") => self.plain_http && realm.host() == Some(self.host.as_str()),
            _ => false,
        }
    }

    /// The `Authorization` value for `scope` under `challenge`, fetching a token if needed.
    async fn authorization(
        &self,
        challenge: &Challenge,
        scope: &str,
        used_token: &mut Option<TokenKey>,
    ) -> Result<Option<String>, UpstreamError> {
        let auth = &self.memory.auth;
        match challenge {
            Challenge::Basic => Ok(auth.credentials.as_ref().map(Credentials::basic)),
            Challenge::Bearer { .. } => {
                let key = AuthState::token_key(challenge, scope).expect("bearer has a token key");
                let token = auth
                    .token(key.clone(), self.fetch_token(key.clone()))
                    .await?;
                *used_token = Some(key);
                Ok(Some(format!("Bearer {}", token.value)))
            }
        }
    }

    /// Asks the token service for a token: a service that cannot be reached, times out or
    /// answers 5xx is an outage; one that refuses is a refusal.
    async fn fetch_token(&self, key: TokenKey) -> Result<auth::Token, UpstreamError> {
        let url = key.url();
        let refused = |message: String| UpstreamError::new(Failure::Refused, message);
        let uri: Uri = url
            .parse()
            .map_err(|e| refused(format!("bad token realm {:?}: {e}", key.realm)))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(refused(format!(
                "token realm {:?} is not http(s)",
                key.realm
            )));
        }
        let mut request = Request::get(uri.clone()).header(header::USER_AGENT, USER_AGENT);
        match &self.memory.auth.credentials {
            Some(credentials) if self.may_send_credentials_to(&uri) => {
                request = request.header(header::AUTHORIZATION, credentials.basic());
            }
            Some(_) => tracing::warn!(
                endpoint = %self.base,
                realm = %key.realm,
                "token realm is plain http on a host other than the endpoint's (or the endpoint is https): asking for an anonymous token instead of sending the password in the clear"
            ),
            None => {}
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| refused(e.to_string()))?;
        tracing::debug!(realm = %key.realm, scope = %key.scope, "fetching upstream token");
        // One deadline for the answer and its (small) body: a token service that stalls
        // mid-body would otherwise hold every request waiting for this token.
        let answer = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_TOKEN_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.response_timeout, answer)
            .await
            .map_err(|_| UpstreamError::outage(format!("token service {} timed out", key.realm)))?
            .map_err(|e| UpstreamError::outage(format!("token service {}: {e}", key.realm)))?;
        if !status.is_success() {
            let message = format!("token service {} answered {status}", key.realm);
            // A refusal of the mirror's own credentials says nothing about the repository:
            // no upstream status goes with it (a tag's record is not removed for it).
            return Err(match Failure::of_status(status) {
                Some(Failure::Outage | Failure::RateLimited) => {
                    UpstreamError::from_status(status, message)
                }
                _ => refused(message),
            });
        }
        auth::parse_token(&body)
            .map_err(|e| UpstreamError::outage(format!("token service {}: {e}", key.realm)))
    }

    /// Sends one request, following redirects; `Authorization` goes only to our own origin.
    async fn send(
        &self,
        method: &Method,
        url: &str,
        accept: &[String],
        range: Option<&str>,
        authorization: Option<&str>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::outage(format!("bad upstream URL {url:?}: {e}")))?;
        for _ in 0..=MAX_REDIRECTS {
            let same_host = self.is_own(&uri);
            let mut request = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(header::USER_AGENT, USER_AGENT);
            for value in accept {
                request = request.header(header::ACCEPT, value.as_str());
            }
            if let Some(range) = range {
                request = request.header(header::RANGE, range);
            }
            if let (true, Some(auth)) = (same_host, authorization) {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let request = request.body(Empty::new()).map_err(|e| {
                UpstreamError::outage(format!("cannot build request for {uri}: {e}"))
            })?;
            let mut response =
                tokio::time::timeout(self.response_timeout, self.http.request(request))
                    .await
                    .map_err(|_| {
                        UpstreamError::outage(format!(
                            "{} did not answer within {:?}",
                            self.base, self.response_timeout
                        ))
                    })?
                    .map_err(|e| {
                        UpstreamError::outage(format!("{}: {}", self.base, error_chain(&e)))
                    })?;
            if !response.status().is_redirection() {
                if !same_host {
                    // A host we were redirected to (a CDN) does not get to name where this
                    // endpoint's credentials go: its refusal stays a refusal.
                    response.headers_mut().remove(header::WWW_AUTHENTICATE);
                }
                return Ok(response);
            }
            uri = redirect_target(&uri, response.headers())?;
            tracing::debug!(from = %self.base, to = %uri.authority().map(|a| a.as_str()).unwrap_or(""), "following upstream redirect");
        }
        Err(UpstreamError::outage(format!(
            "{}: more than {MAX_REDIRECTS} redirects",
            self.base
        )))
    }

    /// A 2xx is an answer; anything else an error of its class (a 429 with its `Retry-After`).
    fn classify(&self, response: Response<Incoming>) -> Result<Answer, UpstreamError> {
        let status = response.status();
        if status.is_success() {
            return Ok(Answer {
                response,
                endpoint_index: 0,
                endpoint: self.base.clone(),
                stall_timeout: self.stall_timeout,
            });
        }
        let error = UpstreamError::from_status(status, format!("{} answered {status}", self.base));
        if status != StatusCode::TOO_MANY_REQUESTS {
            return Err(error);
        }
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Err(error.with_retry_after(retry_after))
    }
}

fn challenge_of(response: &Response<Incoming>) -> Option<Challenge> {
    response
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(auth::parse_challenge)
}

/// Resolves a redirect's `Location` against the request URI; only http(s) targets are followed
/// (anything else is an outage of this endpoint: it cannot deliver).
fn redirect_target(from: &Uri, headers: &HeaderMap) -> Result<Uri, UpstreamError> {
    let location = headers
        .get(header::LOCATION)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .ok_or_else(|| UpstreamError::outage(format!("redirect from {from} without Location")))?;
    let target: Uri = if location.starts_with('/') {
        let scheme = from.scheme_str().unwrap_or("https");
        let authority = from.authority().map(|a| a.as_str()).unwrap_or("");
        format!("{scheme}://{authority}{location}").parse()
    } else {
        location.parse()
    }
    .map_err(|e| UpstreamError::outage(format!("bad redirect Location {location:?}: {e}")))?;
    match target.scheme_str() {
        Some("http" | "https") if target.authority().is_some() => Ok(target),
        _ => Err(UpstreamError::outage(format!(
            "refusing redirect to {location:?}"
        ))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn http_client(connect_timeout: Duration, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_and_refuse_other_schemes() {
        let from: Uri = "https://registry.example/v2/a/blobs/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            "https://cdn.example/data?sig=1".parse().unwrap(),
        );
        assert_eq!(
            redirect_target(&from, &h).unwrap().to_string(),
            "https://cdn.example/data?sig=1"
        );
        h.insert(header::LOCATION, "/other/path".parse().unwrap());
        assert_eq!(
            redirect_target(&from, &h).unwrap().to_string(),
            "https://registry.example/other/path"
        );
        h.insert(header::LOCATION, "file:///etc/passwd".parse().unwrap());
        assert!(redirect_target(&from, &h).is_err());
        h.insert(header::LOCATION, "ftp://x/y".parse().unwrap());
        assert!(redirect_target(&from, &h).is_err());
        assert!(redirect_target(&from, &HeaderMap::new()).is_err());
    }

    fn endpoint(url: &str) -> Endpoint {
        let mut config = UpstreamConfig::new(url);
        config.username = Some("mirror".into());
        config.password = Some(crate::config::Secret::new("secret".into()));
        Endpoint::new(&config, &[]).unwrap()
    }

    #[test]
    fn credentials_go_in_the_clear_only_to_a_plain_http_endpoints_own_host() {
        let lan = endpoint("http://registry.lan:5000");
        let realm = |u: &str| u.parse::<Uri>().unwrap();
        assert!(lan.may_send_credentials_to(&realm("http://registry.lan:5001/auth")));
        assert!(lan.may_send_credentials_to(&realm("http://registry.lan/auth")));
        assert!(lan.may_send_credentials_to(&realm("https://auth.example/token")));
        assert!(!lan.may_send_credentials_to(&realm("http://other.lan:5001/auth")));
        let tls = endpoint("https://registry.lan");
        assert!(!tls.may_send_credentials_to(&realm("http://registry.lan:5001/auth")));
        assert!(tls.may_send_credentials_to(&realm("https://registry.lan:5001/auth")));
    }

    #[test]
    fn memory_is_kept_only_for_the_same_url_and_credentials() {
        let first = endpoint("http://registry.lan:5000");
        let known = [Arc::clone(&first.memory)];
        let mut same = UpstreamConfig::new("http://registry.lan:5000/");
        same.username = Some("mirror".into());
        same.password = Some(crate::config::Secret::new("secret".into()));
        let kept = Endpoint::new(&same, &known).unwrap();
        assert!(Arc::ptr_eq(&kept.memory, &first.memory));
        same.password = Some(crate::config::Secret::new("rotated".into()));
        let fresh = Endpoint::new(&same, &known).unwrap();
        assert!(!Arc::ptr_eq(&fresh.memory, &first.memory));
        let anonymous = Endpoint::new(&UpstreamConfig::new("http://registry.lan:5000"), &known);
        assert!(!Arc::ptr_eq(&anonymous.unwrap().memory, &first.memory));
    }
}
