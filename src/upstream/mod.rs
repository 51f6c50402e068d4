//! Talking to upstream registries: one [`RegistryUpstream`] per configured registry, holding its
//! endpoints in order of preference, each with its own HTTP client, timeouts and auth state.
//!
//! A request goes to the first endpoint; on a connection error, a timeout, a 5xx or a 429 it moves
//! on to the next. Redirects (Docker Hub sends blobs to a CDN) are followed for GET and HEAD, and
//! `Authorization` is sent only to the endpoint's own host. This module returns responses and
//! typed errors; it knows nothing of the cache.

pub mod auth;
pub mod health;

use crate::config::{RegistryConfig, UpstreamConfig};
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::oci::{Reference, RepoName};
use auth::{AuthState, Challenge, Credentials, TokenKey};
use bytes::Bytes;
use health::{Admission, Health, HealthSnapshot};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 5;
/// Largest token endpoint answer read.
const MAX_TOKEN_BYTES: usize = 64 * 1024;
const USER_AGENT: &str = concat!("regmirror/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Why an upstream request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{message}")]
    Status { status: u16, message: String },
    #[error("{message}")]
    RateLimited {
        retry_after: Option<u64>,
        message: String,
    },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Redirect(String),
    #[error("{0}")]
    Body(String),
    #[error("{0}")]
    TooLarge(String),
}

impl UpstreamError {
    /// Whether the next endpoint might do better: anything but an answer too large to take.
    fn try_next(&self) -> bool {
        !matches!(self, UpstreamError::TooLarge(_))
    }

    /// Whether the endpoint itself is unwell (and should be skipped for a while), as opposed to
    /// refusing this one request (401, 403, a bad redirect) or rate limiting us.
    fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Timeout(_) | UpstreamError::Body(_) => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

tokio::task_local! {
    /// The endpoint that answered the current request's upstream fetch, for its access line.
    static ANSWERED_BY: std::cell::RefCell<Option<String>>;
}

/// Runs a request's handling and returns, beside its output, the endpoint that answered it
/// (if it went upstream).
pub async fn noting_endpoint<F: std::future::Future>(f: F) -> (F::Output, Option<String>) {
    ANSWERED_BY
        .scope(std::cell::RefCell::new(None), async {
            let out = f.await;
            let who = ANSWERED_BY.with(|c| c.borrow().clone());
            (out, who)
        })
        .await
}

/// Records the endpoint that answered (a no-op outside `noting_endpoint`, e.g. in fills).
pub fn note_endpoint(base: &str) {
    let _ = ANSWERED_BY.try_with(|c| *c.borrow_mut() = Some(base.to_string()));
}

/// What to ask an upstream for.
pub struct UpstreamRequest<'a> {
    pub method: Method,
    pub repo: &'a RepoName,
    /// The path after `/v2/<repo>/`, with its query (`manifests/latest`, `tags/list?n=10`).
    pub rest: String,
    pub accept: &'a [String],
    /// Asks what a tag means: only endpoints trusted to resolve tags are asked.
    pub resolves_tag: bool,
    /// A manifest GET, which counts against Docker Hub's pull limit: not sent to an endpoint
    /// that is rate limiting us.
    pub counts_as_pull: bool,
    /// Resume a blob: `Range: bytes=N-`.
    pub range_from: Option<u64>,
}

impl<'a> UpstreamRequest<'a> {
    pub fn manifest(
        method: Method,
        repo: &'a RepoName,
        reference: &Reference,
        accept: &'a [String],
    ) -> Self {
        UpstreamRequest {
            counts_as_pull: method == Method::GET,
            method,
            repo,
            rest: format!("manifests/{reference}"),
            accept,
            resolves_tag: matches!(reference, Reference::Tag(_)),
            range_from: None,
        }
    }

    pub fn blob(method: Method, repo: &'a RepoName, digest: &Digest) -> Self {
        UpstreamRequest {
            method,
            repo,
            rest: format!("blobs/{digest}"),
            accept: &[],
            resolves_tag: false,
            counts_as_pull: false,
            range_from: None,
        }
    }

    pub fn tags_list(repo: &'a RepoName, query: Option<&str>) -> Self {
        let rest = match query {
            Some(q) => format!("tags/list?{q}"),
            None => "tags/list".to_string(),
        };
        UpstreamRequest {
            method: Method::GET,
            repo,
            rest,
            accept: &[],
            resolves_tag: true,
            counts_as_pull: false,
            range_from: None,
        }
    }

    pub fn referrers(repo: &'a RepoName, digest: &Digest, accept: &'a [String]) -> Self {
        UpstreamRequest {
            method: Method::GET,
            repo,
            rest: format!("referrers/{digest}"),
            accept,
            resolves_tag: false,
            counts_as_pull: false,
            range_from: None,
        }
    }

    /// The same request for the bytes from `offset` on.
    pub fn resume_from(mut self, offset: u64) -> Self {
        self.range_from = (offset > 0).then_some(offset);
        self
    }
}

/// A successful (2xx) or not-found (404) answer, with what it came from.
pub struct Answer {
    pub response: Response<Incoming>,
    /// Which endpoint answered (its index in the registry's list).
    pub endpoint_index: usize,
    /// The endpoint's base URL, for logs.
    pub endpoint: String,
    /// How long the body may go without a byte.
    pub stall_timeout: Duration,
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    /// The declared `Content-Length`, if any.
    pub fn content_length(&self) -> Option<u64> {
        content_length(self.headers())
    }

    /// Reads the whole body, refusing more than `limit` bytes.
    pub async fn bytes(self, limit: usize) -> Result<Bytes, UpstreamError> {
        let endpoint = self.endpoint;
        let stall = self.stall_timeout;
        let body = Limited::new(self.response.into_body(), limit);
        match tokio::time::timeout(stall, body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(
                UpstreamError::TooLarge(format!("{endpoint}: answer larger than {limit} bytes")),
            ),
            Ok(Err(e)) => Err(UpstreamError::Body(format!("{endpoint}: {e}"))),
            Err(_) => Err(UpstreamError::Timeout(format!("{endpoint}: body stalled"))),
        }
    }
}

/// An endpoint's state for status pages and metrics.
#[derive(Clone, Debug)]
pub struct EndpointStatus {
    pub url: String,
    pub resolve_tags: bool,
    pub health: HealthSnapshot,
}

/// The upstream side of one registry.
pub struct RegistryUpstream {
    pub name: String,
    endpoints: Vec<Endpoint>,
    allow_untrusted_tags: bool,
    metrics: Arc<Metrics>,
}

impl RegistryUpstream {
    /// Builds the clients; fails on an unusable `ca_file`.
    pub fn new(config: &RegistryConfig, metrics: Arc<Metrics>) -> Result<RegistryUpstream, String> {
        Ok(RegistryUpstream {
            metrics,
            name: config.name.clone(),
            endpoints: config
                .upstream
                .iter()
                .map(|u| Endpoint::new(u, config.failover_cooldown))
                .collect::<Result<_, _>>()?,
            allow_untrusted_tags: config.allow_untrusted_tags,
        })
    }

    /// Sends `request` to the first endpoint that may answer it: in configured order, trusted
    /// for tags when the request resolves one, not in a cool-down, not rate limiting a pull.
    /// Connection errors, timeouts, 5xx and 429 move on to the next endpoint and are remembered.
    /// Returns a 2xx or 404 answer; anything else is an error.
    pub async fn fetch(&self, request: &UpstreamRequest<'_>) -> Result<Answer, UpstreamError> {
        let scope = format!("repository:{}:pull", request.repo.as_str());
        let mut last_error = None;
        let mut not_found = None;
        for pass in [Pass::Trusted, Pass::Untrusted] {
            if pass == Pass::Untrusted && not_found.is_some() {
                break; // a trusted endpoint's 404 for a tag is not overruled
            }
            for (index, endpoint) in self.endpoints.iter().enumerate() {
                if !self.eligible(endpoint, request, pass) {
                    continue;
                }
                let now = Instant::now();
                if request.counts_as_pull {
                    if let Some(pause) = endpoint.health.rate_limit_pause(now) {
                        last_error = Some(UpstreamError::RateLimited {
                            retry_after: Some(pause.as_secs().max(1)),
                            message: format!(
                                "{} is rate limiting pulls for {}s more",
                                endpoint.base,
                                pause.as_secs()
                            ),
                        });
                        continue;
                    }
                }
                if endpoint.health.admit(now) == Admission::Down {
                    last_error.get_or_insert_with(|| {
                        UpstreamError::Connect(format!("{} is down (cooling off)", endpoint.base))
                    });
                    continue;
                }
                let started = std::time::Instant::now();
                // Boxed: an HTTP exchange's future is large, and callers need not carry it.
                let result = Box::pin(endpoint.fetch(request, &scope)).await;
                self.record(endpoint, &result, started);
                // Any answer, a refusal or a 429 too, shows the endpoint is there (and ends a
                // probe): only an outage keeps it down.
                if result.as_ref().err().is_none_or(|e| !e.is_outage()) {
                    endpoint.health.mark_up();
                }
                match result {
                    // Another endpoint may have what this one lacks (a partial public mirror);
                    // the 404 stands only if nobody has it.
                    Ok(answer) if answer.status() == StatusCode::NOT_FOUND => {
                        not_found.get_or_insert(Answer {
                            endpoint_index: index,
                            ..answer
                        });
                    }
                    Ok(mut answer) => {
                        answer.endpoint_index = index;
                        note_endpoint(&endpoint.base);
                        return Ok(answer);
                    }
                    Err(e) if e.try_next() => {
                        self.note_failure(index, &e);
                        last_error = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(answer) = not_found {
            note_endpoint(&answer.endpoint);
            return Ok(answer);
        }
        Err(last_error.unwrap_or_else(|| {
            UpstreamError::Connect(format!("no endpoint of {} may answer this", self.name))
        }))
    }

    fn record(
        &self,
        endpoint: &Endpoint,
        result: &Result<Answer, UpstreamError>,
        started: std::time::Instant,
    ) {
        let status = match result {
            Ok(answer) => answer.status().as_u16().to_string(),
            Err(UpstreamError::Status { status, .. }) => status.to_string(),
            Err(UpstreamError::RateLimited { .. }) => "429".to_string(),
            Err(_) => "error".to_string(),
        };
        self.metrics.upstream_request(
            &self.name,
            &endpoint.base,
            &status,
            started.elapsed().as_secs_f64(),
        );
    }

    /// Counts blob bytes received from upstream.
    pub fn received(&self, bytes: u64) {
        self.metrics.upstream_bytes(&self.name, bytes);
    }

    /// Counts content that did not match its digest.
    pub fn mismatch(&self) {
        self.metrics.digest_mismatch();
    }

    /// Sends `request` to one given endpoint, whatever its health (a last resort for resuming).
    pub async fn fetch_from(
        &self,
        index: usize,
        request: &UpstreamRequest<'_>,
    ) -> Result<Answer, UpstreamError> {
        let endpoint = self
            .endpoints
            .get(index)
            .ok_or_else(|| UpstreamError::Connect(format!("no endpoint {index}")))?;
        let scope = format!("repository:{}:pull", request.repo.as_str());
        let started = std::time::Instant::now();
        let result = Box::pin(endpoint.fetch(request, &scope)).await;
        self.record(endpoint, &result, started);
        let mut answer = result?;
        endpoint.health.mark_up();
        answer.endpoint_index = index;
        Ok(answer)
    }

    fn eligible(&self, endpoint: &Endpoint, request: &UpstreamRequest<'_>, pass: Pass) -> bool {
        let trusted = !request.resolves_tag || endpoint.resolve_tags;
        match pass {
            Pass::Trusted => trusted,
            Pass::Untrusted => !trusted && self.allow_untrusted_tags,
        }
    }

    /// Remembers that an endpoint failed (also used when its body stalls mid-download).
    pub fn note_failure(&self, index: usize, error: &UpstreamError) {
        let Some(endpoint) = self.endpoints.get(index) else {
            return;
        };
        let now = Instant::now();
        match error {
            UpstreamError::RateLimited { retry_after, .. } => {
                let pause = endpoint.health.rate_limited(now, *retry_after);
                tracing::warn!(registry = %self.name, endpoint = %endpoint.base, pause_s = pause.as_secs(), "upstream rate limit hit; pausing manifest GETs");
            }
            outage if outage.is_outage() => {
                endpoint.health.mark_down(now, &outage.to_string());
                tracing::warn!(registry = %self.name, endpoint = %endpoint.base, error = %outage, "upstream endpoint failed; skipping it for the cool-down");
            }
            refusal => {
                tracing::warn!(registry = %self.name, endpoint = %endpoint.base, error = %refusal, "upstream endpoint refused the request; trying the next");
            }
        }
    }

    /// Every endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| EndpointStatus {
                url: e.base.clone(),
                resolve_tags: e.resolve_tags,
                health: e.health.snapshot(now),
            })
            .collect()
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Endpoints trusted for the request are tried first; untrusted ones only where allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Trusted,
    Untrusted,
}

/// One upstream URL with its client, timeouts and auth state.
struct Endpoint {
    /// Base URL without a trailing slash, e.g. `https://registry-1.docker.io`.
    base: String,
    /// `host[:port]` of the base, the only host that gets our `Authorization`.
    authority: String,
    http: HttpClient,
    auth: AuthState,
    response_timeout: Duration,
    stall_timeout: Duration,
    /// May say what a tag points to.
    resolve_tags: bool,
    health: Health,
}

impl Endpoint {
    fn new(config: &UpstreamConfig, cooldown: Duration) -> Result<Endpoint, String> {
        let base = config.url.trim_end_matches('/').to_string();
        let authority = base
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
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
        Ok(Endpoint {
            base,
            authority,
            http: http_client(config.connect_timeout, tls),
            auth: AuthState::new(credentials),
            response_timeout: config.response_timeout,
            stall_timeout: config.stall_timeout,
            resolve_tags: config.resolve_tags,
            health: Health::new(cooldown),
        })
    }

    async fn fetch(
        &self,
        request: &UpstreamRequest<'_>,
        scope: &str,
    ) -> Result<Answer, UpstreamError> {
        let url = format!(
            "{}/v2/{}/{}",
            self.base,
            request.repo.as_str(),
            request.rest
        );
        let (method, accept) = (&request.method, request.accept);
        let range = request.range_from.map(|n| format!("bytes={n}-"));
        let range = range.as_deref();
        let mut used_token = None;
        let mut authorization = match self.auth.known_challenge() {
            Some(challenge) => {
                self.authorization(&challenge, scope, &mut used_token)
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
                    self.auth.forget(&key).await;
                }
                self.auth.remember(challenge.clone());
                // Tokens are keyed by the scope this request needs (the one Docker Hub's
                // challenge names too), so the preemptive path finds them again.
                authorization = self
                    .authorization(&challenge, scope, &mut used_token)
                    .await?;
                if authorization.is_some() {
                    response = self
                        .send(method, &url, accept, range, authorization.as_deref())
                        .await?;
                }
            }
        }
        self.health.observe(response.headers());
        self.classify(response)
    }

    /// Whether `uri` is this endpoint's own origin (scheme and host): the only place its
    /// `Authorization` goes (an https endpoint redirecting to plain http of the same host gets
    /// none).
    fn is_own(&self, uri: &Uri) -> bool {
        let scheme = self.base.split("://").next().unwrap_or("");
        uri.scheme_str() == Some(scheme)
            && uri.authority().map(|a| a.as_str()) == Some(self.authority.as_str())
    }

    /// The `Authorization` value for `scope` under `challenge`, fetching a token if needed.
    async fn authorization(
        &self,
        challenge: &Challenge,
        scope: &str,
        used_token: &mut Option<TokenKey>,
    ) -> Result<Option<String>, UpstreamError> {
        match challenge {
            Challenge::Basic => Ok(self.auth.credentials.as_ref().map(Credentials::basic)),
            Challenge::Bearer { .. } => {
                let key = AuthState::token_key(challenge, scope).expect("bearer has a token key");
                let token = self
                    .auth
                    .token(key.clone(), self.fetch_token(key.clone()))
                    .await
                    .map_err(UpstreamError::Auth)?;
                *used_token = Some(key);
                Ok(Some(format!("Bearer {}", token.value)))
            }
        }
    }

    async fn fetch_token(&self, key: TokenKey) -> Result<auth::Token, String> {
        let url = key.url();
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("bad token realm {:?}: {e}", key.realm))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("token realm {:?} is not http(s)", key.realm));
        }
        // Credentials travel to the realm only over TLS, or in the clear to the endpoint's own
        // host (a LAN registry the operator chose to reach over http).
        let protected = uri.scheme_str() == Some("https") || self.is_own(&uri);
        let mut request = Request::get(uri).header(header::USER_AGENT, USER_AGENT);
        match &self.auth.credentials {
            Some(credentials) if protected => {
                request = request.header(header::AUTHORIZATION, credentials.basic());
            }
            Some(_) => tracing::warn!(
                realm = %key.realm,
                "token realm is plain http on another host; asking for an anonymous token instead of sending the password"
            ),
            None => {}
        }
        let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
        tracing::debug!(realm = %key.realm, scope = %key.scope, "fetching upstream token");
        // One deadline for the answer and its (small) body: a token service that stalls
        // mid-body would otherwise hold every request waiting for this token.
        let answer = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
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
            .map_err(|_| format!("token endpoint {} timed out", key.realm))?
            .map_err(|e| format!("token endpoint {}: {e}", key.realm))?;
        if !status.is_success() {
            return Err(format!("token endpoint {} answered {status}", key.realm));
        }
        auth::parse_token(&body)
    }

    /// Sends one request, following redirects; `Authorization` goes only to our own host.
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
            .map_err(|e| UpstreamError::Connect(format!("bad upstream URL {url:?}: {e}")))?;
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
                UpstreamError::Connect(format!("cannot build request for {uri}: {e}"))
            })?;
            let mut response =
                tokio::time::timeout(self.response_timeout, self.http.request(request))
                    .await
                    .map_err(|_| {
                        UpstreamError::Timeout(format!(
                            "{} did not answer within {:?}",
                            self.base, self.response_timeout
                        ))
                    })?
                    .map_err(|e| {
                        UpstreamError::Connect(format!("{}: {}", self.base, error_chain(&e)))
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
        Err(UpstreamError::Redirect(format!(
            "{}: more than {MAX_REDIRECTS} redirects",
            self.base
        )))
    }

    fn classify(&self, response: Response<Incoming>) -> Result<Answer, UpstreamError> {
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(Answer {
                response,
                endpoint_index: 0,
                endpoint: self.base.clone(),
                stall_timeout: self.stall_timeout,
            });
        }
        let message = format!("{} answered {status}", self.base);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            return Err(UpstreamError::RateLimited {
                retry_after,
                message,
            });
        }
        Err(UpstreamError::Status {
            status: status.as_u16(),
            message,
        })
    }
}

/// A `Content-Length` header's value.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn challenge_of(response: &Response<Incoming>) -> Option<Challenge> {
    response
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(auth::parse_challenge)
}

/// Resolves a redirect's `Location` against the request URI; only http(s) targets are followed.
fn redirect_target(from: &Uri, headers: &HeaderMap) -> Result<Uri, UpstreamError> {
    let location = headers
        .get(header::LOCATION)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .ok_or_else(|| UpstreamError::Redirect(format!("redirect from {from} without Location")))?;
    let target: Uri = if location.starts_with('/') {
        let scheme = from.scheme_str().unwrap_or("https");
        let authority = from.authority().map(|a| a.as_str()).unwrap_or("");
        format!("{scheme}://{authority}{location}").parse()
    } else {
        location.parse()
    }
    .map_err(|e| UpstreamError::Redirect(format!("bad redirect Location {location:?}: {e}")))?;
    match target.scheme_str() {
        Some("http" | "https") if target.authority().is_some() => Ok(target),
        _ => Err(UpstreamError::Redirect(format!(
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
}
