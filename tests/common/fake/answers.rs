//! How the fake registry answers one request: the registry API (manifests, blobs with
//! `Range`, `tags/list` with pagination, a token), and the faults its knobs ask for.

use super::{Knobs, State};
use crate::common::TestBody;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use regmirror::digest::Digest;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub(super) async fn serve(
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let method = req.method().clone();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_string());
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap().to_string());
    let knobs = {
        let mut s = state.lock().unwrap();
        if path.contains("/blobs/") || path.starts_with("/cdn/") {
            s.ranges.push(range.clone());
        }
        *s.hits.entry(format!("{method} {path}")).or_default() += 1;
        s.authorizations.push((path.clone(), auth.clone()));
        s.knobs.clone()
    };
    if let Some(status) = knobs.fail_status {
        let retry = knobs.fail_retry_after.map(|s| s.to_string());
        let headers: Vec<(&str, &str)> =
            retry.iter().map(|r| ("retry-after", r.as_str())).collect();
        return respond(
            status,
            "application/json",
            Bytes::from_static(b"{\"errors\":[]}"),
            &headers,
        );
    }
    if path == "/token" {
        let body = match knobs.token_expires_in {
            Some(s) => format!(r#"{{"token":"tok-{s}","expires_in":{s}}}"#),
            None => r#"{"token":"tok-default"}"#.to_string(),
        };
        return respond(200, "application/json", Bytes::from(body), &[]);
    }
    if let Some(digest) = path.strip_prefix("/cdn/") {
        let blob = state.lock().unwrap().blobs.get(digest).cloned();
        return match blob {
            Some(b) => blob_response(b, &knobs, method == Method::HEAD),
            None => respond(404, "application/json", Bytes::new(), &[]),
        };
    }
    let token_ok = |a: &str| match &knobs.accepted_token {
        Some(only) => a.strip_prefix("Bearer ") == Some(only.as_str()),
        None => a.starts_with("Bearer tok-"),
    };
    if knobs.require_token && !auth.as_deref().is_some_and(token_ok) {
        let realm = knobs
            .token_realm
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let challenge =
            format!(r#"Bearer realm="{realm}/token",service="fake",scope="repository:x:pull""#);
        return respond(
            401,
            "application/json",
            Bytes::new(),
            &[("www-authenticate", &challenge)],
        );
    }
    if let Some(expected) = &knobs.require_basic {
        if auth.as_deref() != Some(expected.as_str()) {
            return respond(
                401,
                "application/json",
                Bytes::new(),
                &[("www-authenticate", r#"Basic realm="fake""#)],
            );
        }
    }
    if path == "/v2/" {
        return respond(200, "application/json", Bytes::from_static(b"{}"), &[]);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return respond(404, "text/plain", Bytes::new(), &[]);
    };
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        let limited = knobs
            .rate_limit_manifests
            .filter(|_| !(knobs.rate_limit_only_gets && method == Method::HEAD));
        if let Some(retry_after) = limited {
            let retry = retry_after.to_string();
            return respond(
                429,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"TOOMANYREQUESTS"}]}"#),
                &[
                    ("retry-after", &retry),
                    ("ratelimit-limit", "100;w=21600"),
                    ("ratelimit-remaining", "0;w=21600"),
                ],
            );
        }
        let found = state
            .lock()
            .unwrap()
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
            .cloned();
        let Some((media_type, bytes)) = found else {
            return respond(
                404,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
                &[],
            );
        };
        if knobs.refuse_manifest_head && method == Method::HEAD {
            return respond(405, "application/json", Bytes::new(), &[]);
        }
        let digest = Digest::of(&bytes).to_string();
        let body = if method == Method::HEAD {
            Bytes::new()
        } else if knobs.corrupt_manifests {
            let mut flipped = bytes.to_vec();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x01;
            Bytes::from(flipped)
        } else {
            bytes.clone()
        };
        let mut r = respond(
            200,
            &media_type,
            body,
            &[("docker-content-digest", &digest)],
        );
        if knobs.rate_limit_headers {
            let h = r.headers_mut();
            h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
            h.insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
            h.insert("docker-ratelimit-source", "192.0.2.7".parse().unwrap());
        }
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, bytes.len().into());
        if knobs.lying_heads && method == Method::HEAD {
            let h = r.headers_mut();
            h.insert(header::CONTENT_LENGTH, (bytes.len() + 1).into());
            h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        }
        if knobs.stall_listings && method == Method::GET {
            return stalling(r, bytes);
        }
        return r;
    }
    if let Some((repo, digest)) = rest.split_once("/blobs/") {
        let elsewhere = knobs
            .blobs_only_in
            .as_deref()
            .is_some_and(|only| only != repo);
        let blob = match elsewhere {
            true => None,
            false => state.lock().unwrap().blobs.get(digest).cloned(),
        };
        let Some(blob) = blob else {
            return respond(
                404,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
                &[],
            );
        };
        if let (Some(location), true) = (&knobs.blob_location, method == Method::GET) {
            return respond(302, "text/plain", Bytes::new(), &[("location", location)]);
        }
        if let (Some(cdn), true) = (&knobs.redirect_blobs_to, method == Method::GET) {
            let location = format!("{cdn}/cdn/{digest}");
            return respond(307, "text/plain", Bytes::new(), &[("location", &location)]);
        }
        let offset = range.filter(|_| !knobs.ignore_range).and_then(|r| {
            r.strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
        });
        if let (Some(offset), false) = (offset, method == Method::HEAD) {
            let total = blob.len();
            let mut r = blob_response(blob.slice(offset.min(total)..), &knobs, false);
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let value = format!("bytes {offset}-{}/{total}", total.saturating_sub(1));
            r.headers_mut()
                .insert(header::CONTENT_RANGE, value.parse().unwrap());
            return r;
        }
        return blob_response(blob, &knobs, method == Method::HEAD);
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        let s = state.lock().unwrap();
        let mut tags: Vec<&String> = s
            .manifests
            .keys()
            .filter(|(r, t)| r == repo && !t.starts_with("sha256:"))
            .map(|(_, t)| t)
            .collect();
        if tags.is_empty() {
            return respond(404, "application/json", Bytes::new(), &[]);
        }
        tags.sort();
        // Pagination as distribution does it: `n` per page, from after `last`, with a `Link`
        // to the next page.
        let param = |key: &str| {
            query.as_deref().and_then(|q| {
                q.split('&')
                    .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_string)
            })
        };
        if let Some(last) = param("last") {
            tags.retain(|t| t.as_str() > last.as_str());
        }
        let mut link = None;
        if let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) {
            if tags.len() > n {
                tags.truncate(n);
                let last = tags.last().unwrap();
                link = Some(format!(
                    "</v2/{repo}/tags/list?last={last}&n={n}>; rel=\"next\""
                ));
            }
        }
        let body = Bytes::from(serde_json::json!({"name": repo, "tags": tags}).to_string());
        let headers: Vec<(&str, &str)> = link.iter().map(|l| ("link", l.as_str())).collect();
        let r = respond(200, "application/json", body.clone(), &headers);
        if knobs.stall_listings {
            return stalling(r, body);
        }
        return r;
    }
    respond(404, "text/plain", Bytes::new(), &[])
}

fn respond(
    status: u16,
    content_type: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Response<TestBody> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(
            http_body_util::Full::new(body)
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// `response` with a body that sends the first half of `bytes`, then hangs.
fn stalling(response: Response<TestBody>, bytes: Bytes) -> Response<TestBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        let half = bytes.slice(..bytes.len() / 2);
        let _ = tx.send(Ok(Frame::data(half))).await;
        tx.closed().await;
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, StreamBody::new(stream).boxed())
}

/// A blob body with the configured faults.
fn blob_response(blob: Bytes, knobs: &Knobs, head: bool) -> Response<TestBody> {
    let mut builder = Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", Digest::of(&blob).to_string());
    if !knobs.no_content_length {
        let lie = usize::from(head && knobs.lying_heads);
        builder = builder.header(header::CONTENT_LENGTH, blob.len() + lie);
    }
    if head {
        return builder
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
    }
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let knobs = knobs.clone();
    tokio::spawn(async move {
        if knobs.stall_blobs {
            tx.closed().await;
            return;
        }
        if let Some(n) = knobs.stall_after {
            let n = n.min(blob.len());
            let _ = tx.send(Ok(Frame::data(blob.slice(..n)))).await;
            tx.closed().await;
            return;
        }
        let mut data = blob.to_vec();
        if knobs.corrupt_blobs && !data.is_empty() {
            let mid = data.len() / 2;
            data[mid] ^= 0xff;
        }
        if knobs.corrupt_last_byte {
            if let Some(last) = data.last_mut() {
                *last ^= 0xff;
            }
        }
        let chunk = knobs.chunk.unwrap_or(64 * 1024).max(1);
        let mut sent = 0usize;
        for (i, piece) in data.chunks(chunk).enumerate() {
            if let Some(limit) = knobs.reset_after {
                if sent + piece.len() > limit {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(
                            &piece[..limit - sent],
                        ))))
                        .await;
                    // Let those bytes reach the peer first: a reset also throws away what
                    // its kernel has not handed to the reader yet.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    let _ = tx.send(Err(std::io::Error::other("injected reset"))).await;
                    return;
                }
            }
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                .await
                .is_err()
            {
                return;
            }
            sent += piece.len();
            if i == 0 {
                if let Some(gate) = &knobs.gate {
                    let _ = gate.acquire().await.map(|p| p.forget());
                }
            }
            if let Some(delay) = knobs.chunk_delay {
                tokio::time::sleep(delay).await;
            }
        }
        if knobs.endless_tail {
            let garbage = Bytes::from(vec![0u8; 64 * 1024]);
            while tx.send(Ok(Frame::data(garbage.clone()))).await.is_ok() {}
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    builder.body(StreamBody::new(stream).boxed()).unwrap()
}
