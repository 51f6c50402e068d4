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
use super::request::{Answer, Resource, UpstreamRequest};
use super::transport::{error_chain, Transport, USER_AGENT};
use crate::config::UpstreamConfig;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest token endpoint answer read.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

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
    /// The client, and the redirects it follows.
    transport: Transport,
    /// The base's host without its port: a plain-http endpoint's token service on this host
    /// (any port) may receive the credentials in the clear.
    host: String,
    /// The endpoint is plain http (the operator chose to reach this host without TLS).
    plain_http: bool,
    pub memory: Arc<Memory>,
    connect_timeout: Duration,
    pub stall_timeout: Duration,
    /// May say what a tag points to.
    pub resolve_tags: bool,
}

impl Endpoint {
    /// Builds the endpoint, taking over `known` memory when it is this endpoint's.
    pub fn new(config: &UpstreamConfig, known: &[Arc<Memory>]) -> Result<Endpoint, String> {
        let base = config.url.trim_end_matches('/').to_string();
        let uri = base.parse::<Uri>().ok();
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
        let (connect, response) = (config.connect_timeout, config.response_timeout);
        Ok(Endpoint {
            transport: Transport::new(&base, connect, response, tls),
            base,
            host,
            plain_http,
            memory,
            connect_timeout: config.connect_timeout,
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
        2 * self.connect_timeout + 4 * self.transport.response_timeout + self.stall_timeout
    }

    /// Probes the endpoint in the background with the request a caller that answers without
    /// upstream meanwhile (a tag's last known digest) would have sent, authentication and all
    /// (a manifest or blob GET goes as a HEAD: it must not count as a pull, nor download a
    /// blob), holding `probe` until the
    /// outcome is recorded.
    pub fn probe_in_background(
        self: &Arc<Self>,
        probe: ProbeGuard,
        mut request: UpstreamRequest,
        longest_back_off: Duration,
    ) {
        if matches!(request.resource, Resource::Manifest | Resource::Blob) {
            request.method = Method::HEAD;
        }
        let endpoint = Arc::clone(self);
        tokio::spawn(async move {
            // Headers are enough: any body is dropped unread.
            match endpoint.fetch(&request).await {
                Ok(_) => {
                    endpoint.health().mark_up();
                    tracing::info!(endpoint = %endpoint.base, "upstream endpoint answers again");
                }
                Err(e) => endpoint.learn(&e, true, longest_back_off),
            }
            probe.answered();
        });
    }

    /// What a failed try teaches about the endpoint: an outage starts (or, for a probe,
    /// lengthens) its back-off; any other answer shows it is there (a 429 pauses its manifest
    /// GETs).
    pub fn learn(&self, error: &UpstreamError, probing: bool, longest_back_off: Duration) {
        let now = tokio::time::Instant::now();
        let health = self.health();
        if error.failure == Failure::Outage {
            let pause = health.mark_down(now, longest_back_off, probing, &error.message);
            tracing::warn!(endpoint = %self.base, error = %error, back_off_ms = pause.as_millis() as u64, "upstream endpoint failed; other endpoints first until it answers again");
            return;
        }
        health.mark_up();
        match error.failure {
            Failure::RateLimited => {
                let pause = health.rate_limited(now, error.retry_after);
                tracing::warn!(endpoint = %self.base, pause_s = pause.as_secs(), "upstream rate limit hit; pausing manifest GETs");
            }
            Failure::Refused | Failure::BadContent => {
                tracing::warn!(endpoint = %self.base, error = %error, class = error.failure.as_str(), "upstream endpoint could not serve the request; trying the next");
            }
            Failure::NotFound | Failure::Outage => {}
        }
    }

    /// Whether a manifest HEAD goes to this endpoint as a GET (it refused HEAD before), which
    /// counts as a pull on registries that count them.
    pub fn sends_head_as_get(&self, request: &UpstreamRequest) -> bool {
        request.is_manifest_head() && self.memory.head_refused.load(Ordering::Relaxed)
    }

    /// Sends `request` and classifies the answer: a 2xx is an [`Answer`], anything else an
    /// error of its class. A manifest HEAD refused with 405 is asked again as a GET, and so are
    /// this endpoint's manifest HEADs from then on.
    pub async fn fetch(&self, request: &UpstreamRequest) -> Result<Answer, UpstreamError> {
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
        request: &UpstreamRequest,
        method: &Method,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let scope = format!("repository:{}:pull", request.repo.as_str());
        let url = format!(
            "{}/v2/{}/{}",
            self.base,
            request.repo.as_str(),
            request.rest
        );
        let accept = &request.accept;
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
            .transport
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
                        .transport
                        .send(method, &url, accept, range, authorization.as_deref())
                        .await?;
                }
            }
        }
        self.memory.health.observe(response.headers());
        Ok(response)
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
                .transport
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
        let (status, body) = tokio::time::timeout(self.transport.response_timeout, answer)
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

#[cfg(test)]
mod tests {
    use super::*;

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
