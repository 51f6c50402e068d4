//! The data path: one request in, one response out. Routes the request, hands it to the
//! manifest or blob path, turns errors into OCI responses, adds the headers every answer
//! carries and writes the access log line. The only module that knows every piece.

mod blob;
mod manifest;
mod misc;
mod prefetch;
mod provenance;
mod tag;

pub use prefetch::Prefetcher;

use crate::access::{Access, Denial, Need, Principal};
use crate::app::App;
use crate::body::{self, ResponseBody, WindowSize};
use crate::error::{Code, Error};
use crate::oci::API_VERSION_HEADER;
use crate::route::{self, Route, RouteError, Target};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Longest request target (path and query) accepted: a maximal name, digest and `ns` query fit
/// in far less.
const MAX_URI_BYTES: usize = 4096;

/// How a request was answered with respect to the cache; stable strings for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Not a cacheable request.
    #[default]
    None,
    /// Served from the cache.
    Hit,
    /// Fetched from upstream (and cached).
    Miss,
    /// Joined a download another request started.
    Join,
    /// Served a last known tag mapping because upstream could not be asked.
    Stale,
    /// Passed through without caching.
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "-",
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Join => "join",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }
}

/// Answers one request.
pub async fn handle<B>(
    app: Arc<App>,
    request: Request<B>,
    client: SocketAddr,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let head = method == http::Method::HEAD;
    let target_length = uri.path_and_query().map_or(0, |p| p.as_str().len());
    let routed = if target_length > MAX_URI_BYTES {
        Err(RouteError::TooLong(MAX_URI_BYTES))
    } else {
        route::route(&method, uri.path(), uri.query(), app.routes())
    };
    let mut outcome = Outcome::None;
    let mut upstream_endpoint = None;
    let mut user = Principal::Anonymous;
    let (mut response, kind, registry, failure) = match routed {
        Ok(route) => {
            let kind = route.kind();
            let registry = route.registry.map(|i| app.routes()[i].name.clone());
            // A peer's request (signed with the cluster secret) was authorized by the replica
            // that asks; anything else signed, or badly signed, is refused.
            let from_peer = request
                .headers()
                .get(crate::cluster::signature::PEER_HEADER)
                .map(|signed| peer_request(&app, &route, &method, &uri, request.headers(), signed));
            let peer_signed = from_peer.is_some();
            let peer_refused = matches!(from_peer, Some(Err(_)));
            let allowed = match (from_peer, app.access()) {
                (Some(checked), _) => checked,
                (None, Some(access)) => {
                    let (who, allowed) =
                        authorize(access, &route, registry.as_deref(), request.headers()).await;
                    user = who;
                    allowed
                }
                (None, None) => Ok(()),
            };
            let result = match allowed {
                Ok(()) => {
                    // Boxed: every await point in `dispatch` would otherwise be carried (and
                    // moved, several times) by each request's future.
                    let window = request.extensions().get().cloned().unwrap_or_default();
                    let dispatched = Box::pin(dispatch(
                        &app,
                        &route,
                        request.headers(),
                        window,
                        &user,
                        peer_signed,
                        &mut outcome,
                    ));
                    let (result, answered_by) = crate::upstream::noting_endpoint(dispatched).await;
                    upstream_endpoint = answered_by;
                    result
                }
                Err(e) => Err(e),
            };
            let (mut response, failure) = match result {
                Ok(response) => (response, None),
                Err(e) => {
                    let text = e.to_string();
                    (e.into_response(head), Some(text))
                }
            };
            if peer_refused {
                // What tells a peer that the cluster refused it (a 403 from upstream does not).
                response.headers_mut().insert(
                    crate::cluster::signature::REFUSED_HEADER,
                    HeaderValue::from_static("1"),
                );
            }
            if let (StatusCode::UNAUTHORIZED, Some(access)) = (response.status(), app.access()) {
                let value = challenge(&app, access, Some(&route.target), request.headers(), &uri);
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            (response, kind, registry, failure)
        }
        Err(e) => {
            let text = e.to_string();
            let refuse = matches!(e, RouteError::UnknownRegistry(_))
                && app.config().server.unknown_registry_status == 403;
            let error = if refuse {
                Error::coded(Code::Denied, text.clone())
            } else {
                Error::from(e)
            };
            (error.into_response(head), "invalid", None, Some(text))
        }
    };
    let status = response.status();
    let headers = response.headers_mut();
    headers.insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    if let Some(ns) = uri.query().and_then(namespace_of) {
        if let Ok(value) = HeaderValue::from_str(&ns) {
            headers.insert("oci-namespace", value);
        }
    }
    let status = status.as_u16();
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    tracing::info!(
        target: "regmirror::access",
        client = %client,
        user = user.name(),
        method = %method,
        path = %uri.path(),
        route = kind,
        registry = registry.as_deref().unwrap_or("-"),
        status,
        cache = outcome.as_str(),
        upstream = upstream_endpoint.as_deref().unwrap_or("-"),
        bytes,
        ms = started.elapsed().as_millis() as u64,
        error = failure.as_deref().unwrap_or(""),
    );
    record(&app, kind, &method, status, outcome, started, response)
}

/// Whether a request signed as a peer's may be served as one: only a blob, or a manifest GET
/// (by digest, or by tag for a tag's owner), only with a cluster, only signed with its secret.
/// Never an open proxy: a peer may ask what any client may pull, and nothing more.
fn peer_request(
    app: &App,
    route: &Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    signed: &HeaderValue,
) -> Result<(), Error> {
    use crate::cluster::signature::INSTANCE_HEADER;
    let checked = match (app.cluster(), &route.target) {
        (None, _) => Err("this replica has no [cluster]"),
        (Some(_), target)
            if !(matches!(target, Target::Blob { .. })
                || matches!(target, Target::Manifest { .. }) && method == http::Method::GET) =>
        {
            Err("peers ask only for blobs, and manifests by digest or tag")
        }
        // Tags only as peers ask for them: never with [auth] on (a peer's request skips it),
        // and with every manifest type accepted (anything narrower is passed through upstream).
        (
            Some(_),
            Target::Manifest {
                reference: crate::oci::Reference::Tag(_),
                ..
            },
        ) if app.access().is_some()
            || !crate::oci::AcceptSet::from_headers(headers).is_canonical() =>
        {
            Err("peers ask for tags only without [auth], with every manifest type accepted")
        }
        (Some(cluster), _)
            if headers.get(INSTANCE_HEADER).map(HeaderValue::as_bytes)
                == Some(cluster.instance().as_bytes()) =>
        {
            Err("it comes from this very replica (listed among the peers under another name?)")
        }
        (Some(cluster), _) => {
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            cluster.signer().verify(method, path, signed)
        }
    };
    if let Some(cluster) = app.cluster() {
        cluster.served(if checked.is_ok() { "served" } else { "refused" });
    }
    checked.map_err(|why| Error::coded(Code::Denied, format!("cluster request refused: {why}")))
}

/// Checks the client may make this request: pulls by the access rules, the API base with any
/// valid credentials, the console with a signed-in user; the token service, health and
/// metrics are open (the token service checks logins itself; probes and scrapers).
/// Returns who the client is (for the access log) whatever the answer.
async fn authorize(
    access: &Access,
    route: &Route,
    registry: Option<&str>,
    headers: &http::HeaderMap,
) -> (Principal, Result<(), Error>) {
    let need = match (&route.target, registry) {
        (
            Target::Manifest { repo, .. }
            | Target::Blob { repo, .. }
            | Target::TagsList { repo, .. }
            | Target::Referrers { repo, .. },
            Some(registry),
        ) => Need::Pull {
            registry,
            repo: repo.as_str(),
        },
        (Target::Status { .. } | Target::Catalog, _) => Need::SignedIn,
        (Target::Healthz | Target::Readyz | Target::Metrics | Target::Token, _) => {
            return (Principal::Anonymous, Ok(()))
        }
        _ => Need::Credentials,
    };
    match access.authorize(headers, need).await {
        Ok(who) => (who, Ok(())),
        Err(denial) => {
            let who = match &denial {
                Denial::Forbidden { user, .. } => Principal::User(user.clone()),
                _ => Principal::Anonymous,
            };
            (who, Err(refusal(denial)))
        }
    }
}

/// The OCI error for a refusal.
fn refusal(denial: Denial) -> Error {
    match denial {
        Denial::Unauthenticated(why) => Error::coded(Code::Unauthorized, why),
        Denial::Forbidden { why, .. } => Error::coded(Code::Denied, why),
        Denial::Busy => Error::coded(
            Code::TooManyRequests,
            "too many logins are being checked; try again shortly",
        ),
    }
}

/// The challenge a 401 carries: Basic for a browser on the console and for the token
/// service itself, else where to fetch a token, as Docker Hub says it.
fn challenge(
    app: &App,
    access: &Access,
    target: Option<&Target>,
    headers: &http::HeaderMap,
    uri: &http::Uri,
) -> HeaderValue {
    let repo = match target {
        None | Some(Target::Status { .. } | Target::Token) => return access.basic_challenge(),
        Some(
            Target::Manifest { repo, .. }
            | Target::Blob { repo, .. }
            | Target::TagsList { repo, .. }
            | Target::Referrers { repo, .. },
        ) => Some(repo.as_str()),
        Some(_) => None,
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .filter(|h| crate::oci::is_host_name(h) || h.parse::<std::net::SocketAddr>().is_ok())
        .map(str::to_string)
        .unwrap_or_else(|| app.config().server.listen.to_string());
    let scheme = if app.config().server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    access.bearer_challenge(&format!("{scheme}://{host}"), repo)
}

/// `GET /token`: a token for the client's login (or an anonymous one).
async fn issue_token(
    app: &App,
    headers: &http::HeaderMap,
    head: bool,
) -> Result<Response<ResponseBody>, Error> {
    let Some(access) = app.access() else {
        return Err(Error::coded(
            Code::NameUnknown,
            "this mirror has no [auth]: it issues no tokens",
        ));
    };
    let token = access.issue_token(headers).await.map_err(refusal)?;
    let lifetime = crate::access::TOKEN_LIFETIME.as_secs();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": lifetime,
    });
    Ok(misc::json(StatusCode::OK, body.to_string(), head))
}

/// Counts the request, its cache outcome and (as they are sent) its body bytes.
fn record(
    app: &App,
    kind: &str,
    method: &http::Method,
    status: u16,
    outcome: Outcome,
    started: Instant,
    response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let metrics = app.metrics();
    metrics.request(kind, method, status, started.elapsed().as_secs_f64());
    if outcome == Outcome::None || !matches!(kind, "blob" | "manifest") {
        return response;
    }
    metrics.cache_outcome(kind, outcome.as_str());
    // Bytes the upstream did not send again for this answer count as saved.
    let saved = matches!(outcome, Outcome::Hit | Outcome::Join | Outcome::Stale);
    let served = metrics.served_bytes_counter(saved);
    response.map(|body| {
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                served.inc_by(data.len() as u64);
            }
            frame
        })
        .boxed_unsync()
    })
}

/// Answers a routed request from its headers and the body windows its connection takes.
async fn dispatch(
    app: &App,
    route: &Route,
    headers: &http::HeaderMap,
    window: WindowSize,
    user: &Principal,
    from_peer: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let head = route.head;
    match &route.target {
        Target::ApiBase => Ok(misc::json(StatusCode::OK, "{}".into(), head)),
        Target::Healthz => Ok(misc::text(StatusCode::OK, "ok\n")),
        Target::Readyz => Ok(misc::readiness(app)),
        Target::Metrics => Ok(misc::metrics(app)),
        Target::Status { page, query } => {
            crate::console::serve(
                app,
                *page,
                query.as_deref(),
                headers,
                head,
                |registry, repo| {
                    app.access()
                        .is_none_or(|access| access.may_pull(user, registry, repo))
                },
            )
            .await
        }
        Target::Token => issue_token(app, headers, head).await,
        Target::Catalog => {
            misc::catalog(app, head, |registry, repo| {
                app.access()
                    .is_none_or(|access| access.may_pull(user, registry, repo))
            })
            .await
        }
        Target::Manifest { repo, reference } => {
            let registry = route.registry.expect("manifests route to a registry");
            let response =
                manifest::serve(app, registry, repo, reference, headers, head, outcome).await?;
            if let (false, crate::oci::Reference::Tag(tag)) = (head, reference) {
                app.console()
                    .popularity()
                    .pulled(&crate::console::popularity::image_key(
                        &app.routes()[registry].name,
                        repo.as_str(),
                        tag.as_str(),
                    ));
            }
            Ok(response)
        }
        Target::Blob { repo, digest } => {
            let registry = route.registry.expect("blobs route to a registry");
            let request = blob::BlobRequest {
                registry,
                repo,
                digest,
                headers,
                head,
                window,
                from_peer,
            };
            blob::serve(app, request, outcome).await
        }
        Target::TagsList { repo, query } => {
            let registry = route.registry.expect("tags route to a registry");
            let addressed = misc::Addressed {
                registry: &app.routes()[registry].name,
                namespace: route.namespace.is_some(),
                prefixed: route.prefixed,
            };
            let query = query.as_deref();
            misc::tags_list(app, registry, repo, query, &addressed, head, outcome).await
        }
        Target::Referrers { repo, digest } => {
            let registry = route.registry.expect("referrers route to a registry");
            misc::referrers(app, registry, repo, digest, head, outcome).await
        }
    }
}

fn namespace_of(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ns=").map(str::to_string))
}

/// An empty body for HEAD, else `bytes`.
fn body_unless_head(bytes: bytes::Bytes, head: bool) -> ResponseBody {
    if head {
        body::empty()
    } else {
        body::full(bytes)
    }
}
