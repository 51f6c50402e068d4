//! The running server's admin socket, `<cache.dir>/admin.sock` (mode 0600: whoever may run the
//! operator commands on the directory, and nobody on the network). `regmirror gc`, `verify`
//! and `ls` find a server holding the directory and act through it, so that the server's index
//! and usage figure stay true: `POST /gc?target=<bytes>`, `POST /verify?sample=&max_bytes=&quarantine=`
//! and `GET /ls` answer with the text the command prints.

use crate::app::Live;
use crate::ops::{self, VerifyOptions};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};

/// The socket's name in the cache directory.
pub const SOCKET: &str = "admin.sock";

/// Makes the admin socket of `dir` anew (the store's lock guarantees one server per
/// directory), before the server takes its first request.
pub fn bind(dir: &Path) -> Option<UnixListener> {
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    match UnixListener::bind(&path) {
        Ok(listener) => {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            Some(listener)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no admin socket: gc, verify and ls will act on the directory");
            None
        }
    }
}

/// Serves the admin socket until the task is dropped.
pub async fn serve(live: Arc<Live>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let live = Arc::clone(&live);
                async move { Ok::<_, Infallible>(answer(&live, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs one command in the server.
async fn answer(live: &Live, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let app = live.get();
    let query = request.uri().query().unwrap_or("").to_string();
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    let cache = Arc::clone(app.cache());
    let done = match (request.method(), request.uri().path()) {
        (&Method::POST, "/gc") => {
            let Some(target) = param("target").and_then(|t| t.parse::<u64>().ok()) else {
                return text(StatusCode::BAD_REQUEST, "gc needs ?target=<bytes>\n".into());
            };
            tokio::task::spawn_blocking(move || {
                Ok::<_, std::io::Error>(ops::render_gc(cache.lifecycle().evict_to(target, "gc")))
            })
            .await
        }
        (&Method::POST, "/verify") => {
            let options = VerifyOptions {
                sample: param("sample").and_then(|v| v.parse().ok()),
                max_bytes: param("max_bytes").and_then(|v| v.parse().ok()),
                quarantine: param("quarantine").as_deref() == Some("true"),
            };
            tokio::task::spawn_blocking(move || {
                let lifecycle = cache.lifecycle();
                let report =
                    ops::verify_store(cache.store(), &options, |digest| lifecycle.forget(digest))?;
                Ok(report.render(options.quarantine))
            })
            .await
        }
        (&Method::GET, "/ls") => {
            tokio::task::spawn_blocking(move || {
                let (tags, objects) = ops::ls_store(cache.store())?;
                Ok(ops::render_ls(&tags, &objects))
            })
            .await
        }
        _ => return text(StatusCode::NOT_FOUND, "no such command\n".into()),
    };
    match done {
        Ok(Ok(output)) => text(StatusCode::OK, output),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("a plain answer")
}

/// Whether a server answers on `dir`'s admin socket.
pub fn socket_of(dir: &Path) -> Option<PathBuf> {
    let path = dir.join(SOCKET);
    path.exists().then_some(path)
}

/// Sends one command to the server on `socket`; its output, or why it failed.
pub async fn command(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<String, String> {
    let failed = |e: &dyn std::fmt::Display| format!("admin socket {}: {e}", socket.display());
    let stream = UnixStream::connect(socket).await.map_err(|e| failed(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, "regmirror")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        Err(failed(&text.trim_end()))
    }
}
