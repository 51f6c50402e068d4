//! One HTTP exchange with an upstream host: the client (TLS, timeouts, HTTP/1.1 and h2), the
//! redirects it follows (Docker Hub sends blobs to a CDN) with `Authorization` only for the
//! endpoint's own origin, and transport errors as text. Knows nothing of registries.

use super::failure::UpstreamError;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 5;
pub const USER_AGENT: &str = concat!("regmirror/", env!("CARGO_PKG_VERSION"));

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The way to one endpoint's origin.
pub struct Transport {
    pub http: HttpClient,
    /// Base URL without a trailing slash, e.g. `https://registry-1.docker.io`.
    base: String,
    /// `host[:port]` of the base, the only origin that gets our `Authorization`.
    authority: String,
    /// Time allowed from sending a request to its answer's headers.
    pub response_timeout: Duration,
}

impl Transport {
    pub fn new(
        base: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> Transport {
        let authority = base
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default();
        Transport {
            http: http_client(connect_timeout, tls),
            base: base.to_string(),
            authority,
            response_timeout,
        }
    }

    /// Whether `uri` is this endpoint's own origin (scheme, host and port): the only place its
    /// `Authorization` goes (an https endpoint redirecting to plain http of the same host gets
    /// none).
    fn is_own(&self, uri: &Uri) -> bool {
        let scheme = self.base.split("://").next().unwrap_or("");
        uri.scheme_str() == Some(scheme)
            && uri.authority().map(|a| a.as_str()) == Some(self.authority.as_str())
    }

    /// Sends one request, following redirects; `Authorization` goes only to our own origin.
    pub async fn send(
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

/// Idle connections kept per upstream host once a crowd of downloads is over (each is an open
/// file and a socket's buffers); more are closed as they come back.
pub const IDLE_CONNECTIONS_PER_HOST: usize = 8;
/// How long an idle upstream connection is kept (closed by the pool's own timer: without one,
/// an idle connection would stay open until its next checkout or the upstream closes it).
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(crate) fn http_client(connect_timeout: Duration, tls: rustls::ClientConfig) -> HttpClient {
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
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
        .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(https)
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
