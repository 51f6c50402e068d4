//! Talking to upstream registries: one [`RegistryUpstream`] per configured registry, holding its
//! endpoints in order of preference, each with its own HTTP client, timeouts and memory
//! (health, rate limits, tokens).
//!
//! A request goes to the registry's endpoints in order until one answers it; every failure is
//! classified once ([`failure`]) and the failures of all endpoints asked combine into the one
//! answer the client gets ([`failure::Verdict`]): a 404 is final only when no endpoint had an
//! outage. Endpoints backing off after an outage are skipped while another may answer, and
//! tried anyway (one probe at a time, others joining it) when none can. This module returns
//! answers and typed errors; it knows nothing of the cache.

pub mod auth;
mod endpoint;
pub mod failure;
pub mod health;
mod request;
pub mod timeline;
mod transport;

pub use endpoint::Memory;
pub use failure::{Failure, UpstreamError};
pub use request::{content_length, Answer, Resource, UpstreamRequest};
pub(crate) use transport::{error_chain, http_client, HttpClient, USER_AGENT};
pub use transport::{IDLE_CONNECTIONS_PER_HOST, IDLE_CONNECTION_TIMEOUT};

use crate::config::RegistryConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
use endpoint::Endpoint;
use failure::Verdict;
use health::{Admission, Health, HealthSnapshot, ProbeGuard};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long endpoints that served content not matching its digest are asked last for it.
const BAD_SOURCE_MEMORY: Duration = Duration::from_secs(3600);

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

/// An endpoint's state for the console and metrics.
#[derive(Clone, Debug)]
pub struct EndpointStatus {
    pub url: String,
    pub resolve_tags: bool,
    pub health: HealthSnapshot,
    /// The state an hour ago and the changes since.
    pub last_hour: (timeline::EndpointState, Vec<timeline::Change>),
}

/// The upstream side of one registry.
pub struct RegistryUpstream {
    pub name: String,
    endpoints: Vec<Arc<Endpoint>>,
    allow_untrusted_tags: bool,
    /// The longest back-off after repeated outages (`failover_cooldown`).
    longest_back_off: Duration,
    /// (endpoint, digest) pairs whose content did not match its digest lately: that endpoint
    /// is asked last for that digest.
    bad_sources: moka::sync::Cache<(usize, Digest), ()>,
    metrics: Arc<Metrics>,
}

impl RegistryUpstream {
    /// Builds the clients, taking over what `known` endpoints learnt (health, rate limits,
    /// tokens) where URL and credentials are unchanged; fails on an unusable `ca_file`.
    pub fn new(
        config: &RegistryConfig,
        metrics: Arc<Metrics>,
        known: &[Arc<Memory>],
    ) -> Result<RegistryUpstream, String> {
        Ok(RegistryUpstream {
            metrics,
            name: config.name.clone(),
            endpoints: config
                .upstream
                .iter()
                .map(|u| Endpoint::new(u, known).map(Arc::new))
                .collect::<Result<_, _>>()?,
            allow_untrusted_tags: config.allow_untrusted_tags,
            longest_back_off: config.failover_cooldown,
            bad_sources: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(BAD_SOURCE_MEMORY)
                .build(),
        })
    }

    /// What the endpoints have learnt, for the next configuration generation.
    pub fn memories(&self) -> Vec<Arc<Memory>> {
        self.endpoints
            .iter()
            .map(|e| Arc::clone(&e.memory))
            .collect()
    }

    /// Sends `request` to the registry's endpoints until one answers with a 2xx; see
    /// [`RegistryUpstream::fetch_with`].
    pub async fn fetch(&self, request: &UpstreamRequest) -> Result<Answer, UpstreamError> {
        self.fetch_with(request, |answer| std::future::ready(Ok(answer)))
            .await
    }

    /// Sends `request` to the endpoints that may answer it, in order (trusted ones first for a
    /// tag; for content by digest, endpoints that served bad content for it last), until one
    /// answers with a 2xx that `take` accepts (`take` reads and checks the answer: bad content
    /// or a broken body move on to the next endpoint too).
    ///
    /// Endpoints backing off are skipped while another may answer; when none could, each is
    /// tried anyway, one probe at a time, unless the request has an answer of its own
    /// (`has_fallback`). A manifest GET is not sent to an endpoint pausing pulls after a 429.
    /// The failures combine into one error ([`Verdict`]).
    pub async fn fetch_with<T, F, Fut>(
        &self,
        request: &UpstreamRequest,
        mut take: F,
    ) -> Result<T, UpstreamError>
    where
        F: FnMut(Answer) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut verdict = Verdict::default();
        let mut backing_off = Vec::new();
        for index in self.order(request) {
            let endpoint = &self.endpoints[index];
            if !self.worth_asking(index, request, &verdict) {
                continue;
            }
            if let Some(paused) = self.pull_pause(endpoint, request) {
                verdict.note(paused);
                continue;
            }
            let probe = match endpoint.health().admit(Instant::now(), false) {
                Admission::Up => None,
                Admission::Probe(probe) if request.has_fallback => {
                    // This request has its own answer: it need not wait for a probe.
                    endpoint.probe_in_background(probe, request.clone(), self.longest_back_off);
                    verdict.note(backing_off_error(endpoint));
                    continue;
                }
                Admission::Probe(probe) => Some(probe),
                Admission::Joining(_) | Admission::Cooling => {
                    backing_off.push(index);
                    continue;
                }
            };
            match self.attempt(index, request, probe, &mut take).await {
                Ok(taken) => return Ok(taken),
                Err(e) => verdict.note(e),
            }
        }
        // Nothing better answered: the endpoints backing off are tried anyway.
        for index in backing_off {
            let endpoint = &self.endpoints[index];
            if request.has_fallback || !self.worth_asking(index, request, &verdict) {
                verdict.note(backing_off_error(endpoint));
                continue;
            }
            if let Some(paused) = self.pull_pause(endpoint, request) {
                verdict.note(paused);
                continue;
            }
            let probe = match self.admit_anyway(endpoint).await {
                Ok(probe) => probe,
                Err(still_down) => {
                    verdict.note(still_down);
                    continue;
                }
            };
            // The probe this request joined may have met a 429.
            if let (None, Some(paused)) = (&probe, self.pull_pause(endpoint, request)) {
                verdict.note(paused);
                continue;
            }
            match self.attempt(index, request, probe, &mut take).await {
                Ok(taken) => return Ok(taken),
                Err(e) => verdict.note(e),
            }
        }
        Err(verdict.settle(request.resource, self.soonest_back()))
    }

    /// Admits a request to an endpoint backing off, for want of another: as its probe, or,
    /// while another request probes it, once that probe says it is up (a probe abandoned by
    /// its request is taken over). An error when it is still down.
    async fn admit_anyway(&self, endpoint: &Endpoint) -> Result<Option<ProbeGuard>, UpstreamError> {
        for _ in 0..3 {
            match endpoint.health().admit(Instant::now(), true) {
                Admission::Up => return Ok(None),
                Admission::Probe(probe) => return Ok(Some(probe)),
                Admission::Joining(joined) => {
                    let abandoned = Health::probe_ended(joined, endpoint.patience()).await;
                    if endpoint.health().is_up() {
                        return Ok(None);
                    }
                    if !abandoned {
                        break;
                    }
                }
                Admission::Cooling => break,
            }
        }
        Err(backing_off_error(endpoint))
    }

    /// The endpoints that may answer `request`, in the order they are asked.
    fn order(&self, request: &UpstreamRequest) -> Vec<usize> {
        let trusted = |i: &usize| self.is_trusted(&self.endpoints[*i], request);
        let bad = |i: &usize| {
            request
                .digest
                .as_ref()
                .is_some_and(|d| self.bad_sources.contains_key(&(*i, d.clone())))
        };
        let all = 0..self.endpoints.len();
        let mut order: Vec<usize> = all.clone().filter(trusted).collect();
        if request.needs_trust && self.allow_untrusted_tags && !request.only_trusted {
            order.extend(all.filter(|i| !trusted(i)));
        }
        // Stable: the configured order holds within each group.
        order.sort_by_key(|i| bad(i));
        order
    }

    /// Whether any endpoint is trusted with tags.
    pub fn has_trusted_endpoint(&self) -> bool {
        self.endpoints.iter().any(|e| e.resolve_tags)
    }

    /// Whether the endpoint at `base` (an answer's `endpoint`) is trusted with tags.
    pub fn base_resolves_tags(&self, base: &str) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.base == base && e.resolve_tags)
    }

    /// Whether endpoint `index` is trusted with tags, and so with what a repository holds.
    pub fn resolves_tags(&self, index: usize) -> bool {
        self.endpoints.get(index).is_some_and(|e| e.resolve_tags)
    }

    fn is_trusted(&self, endpoint: &Endpoint, request: &UpstreamRequest) -> bool {
        !request.needs_trust || endpoint.resolve_tags
    }

    /// An untrusted endpoint is not asked once a trusted one said the thing does not exist.
    fn worth_asking(&self, index: usize, request: &UpstreamRequest, verdict: &Verdict) -> bool {
        self.is_trusted(&self.endpoints[index], request) || !verdict.has_trusted_not_found()
    }

    /// The error for a pull not sent because the endpoint is pausing pulls after a 429.
    fn pull_pause(&self, endpoint: &Endpoint, request: &UpstreamRequest) -> Option<UpstreamError> {
        if !request.counts_as_pull && !endpoint.sends_head_as_get(request) {
            return None;
        }
        let pause = endpoint.health().rate_limit_pause(Instant::now())?;
        Some(
            UpstreamError::new(
                Failure::RateLimited,
                format!(
                    "{} is rate limiting pulls for {}s more",
                    endpoint.base,
                    pause.as_secs()
                ),
            )
            .with_retry_after(Some(pause.as_secs().max(1))),
        )
    }

    /// One endpoint's try: the exchange, then `take`; its outcome is remembered (and, for a
    /// probe, told to the requests that joined it).
    async fn attempt<T, F, Fut>(
        &self,
        index: usize,
        request: &UpstreamRequest,
        probe: Option<ProbeGuard>,
        take: &mut F,
    ) -> Result<T, UpstreamError>
    where
        F: FnMut(Answer) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let endpoint = &self.endpoints[index];
        let started = std::time::Instant::now();
        // Boxed: an HTTP exchange's future is large, and callers need not carry it.
        let result = Box::pin(endpoint.fetch(request)).await;
        self.record(endpoint, &result, started);
        let result = match result {
            Ok(mut answer) => {
                answer.endpoint_index = index;
                take(answer).await
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                endpoint.health().mark_up();
                note_endpoint(&endpoint.base);
            }
            Err(e) => {
                // Content that did not match its digest (not a HEAD short of headers).
                let content = request.method == http::Method::GET;
                if let (Failure::BadContent, Some(digest), true) =
                    (e.failure, &request.digest, content)
                {
                    self.served_bad_content(&[index], digest);
                }
                self.note_outcome(index, e, probe.is_some());
            }
        }
        if let Some(probe) = probe {
            probe.answered();
        }
        result.map_err(|mut e| {
            e.authoritative = self.is_trusted(endpoint, request);
            if e.failure == Failure::RateLimited && e.retry_after.is_none() {
                // Upstream did not say when: the pause the mirror keeps is the client's answer.
                let pause = endpoint.health().rate_limit_pause(Instant::now());
                e.retry_after = pause.map(|p| p.as_secs().max(1));
            }
            e
        })
    }

    fn record(
        &self,
        endpoint: &Endpoint,
        result: &Result<Answer, UpstreamError>,
        started: std::time::Instant,
    ) {
        let status = match result {
            Ok(answer) => answer.status().as_u16().to_string(),
            Err(UpstreamError {
                status: Some(status),
                ..
            }) => status.to_string(),
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

    /// Remembers that these endpoints together served content for `digest` that did not match
    /// it: they are asked for it after every other endpoint for a while.
    pub fn served_bad_content(&self, endpoints: &[usize], digest: &Digest) {
        for &index in endpoints {
            if let Some(endpoint) = self.endpoints.get(index) {
                tracing::warn!(registry = %self.name, endpoint = %endpoint.base, %digest, "upstream endpoint served content that does not match its digest; asking it last for this digest");
                self.bad_sources.insert((index, digest.clone()), ());
            }
        }
    }

    /// Remembers an endpoint's failure (also used when its body stalls mid-download).
    pub fn note_failure(&self, index: usize, error: &UpstreamError) {
        self.note_outcome(index, error, false);
    }

    /// What a failure teaches about its endpoint (see [`Endpoint::learn`]).
    fn note_outcome(&self, index: usize, error: &UpstreamError, probing: bool) {
        if let Some(endpoint) = self.endpoints.get(index) {
            endpoint.learn(error, probing, self.longest_back_off);
        }
    }

    /// Seconds until the first endpoint backing off may be back (at least one).
    fn soonest_back(&self) -> Option<u64> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .filter_map(|e| e.health().back_off_left(now))
            .min()
            .map(|left| left.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Every endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| EndpointStatus {
                url: e.base.clone(),
                resolve_tags: e.resolve_tags,
                health: e.health().snapshot(now),
                last_hour: e.health().last_hour(),
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

/// The error for an endpoint backing off that was not (or could not be) tried.
fn backing_off_error(endpoint: &Endpoint) -> UpstreamError {
    UpstreamError::outage(format!("{} is backing off after an outage", endpoint.base))
}
