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
use std::sync::atomic::{AtomicBool, Ordering};
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

/// What the commands running in the server share: whether the server stops (a verify then
/// ends before its next entry), and the one verify that may run at a time.
#[derive(Default)]
struct Commands {
    stopping: AtomicBool,
    verifying: std::sync::Mutex<()>,
}

/// Tells running commands to stop when the serving task goes.
struct StopOnDrop(Arc<Commands>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopping.store(true, Ordering::Relaxed);
    }
}

/// Serves the admin socket until the task is dropped, which ends its connections too. Only
/// this user (or root) is served, whatever the socket's mode.
pub async fn serve(live: Arc<Live>, listener: UnixListener) {
    let commands = Arc::new(Commands::default());
    let _stop = StopOnDrop(Arc::clone(&commands));
    let mut connections = tokio::task::JoinSet::new();
    // SAFETY: geteuid only reads the process's effective user.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if !stream
            .peer_cred()
            .is_ok_and(|peer| peer.uid() == me || peer.uid() == 0)
        {
            continue;
        }
        let (live, commands) = (Arc::clone(&live), Arc::clone(&commands));
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (live, commands) = (Arc::clone(&live), Arc::clone(&commands));
                async move { Ok::<_, Infallible>(answer(&live, &commands, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs one command in the server.
async fn answer(
    live: &Live,
    commands: &Arc<Commands>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
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
            let (Ok(sample), Ok(max_bytes)) = (
                param("sample").map(|v| v.parse()).transpose(),
                param("max_bytes").map(|v| v.parse()).transpose(),
            ) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "sample and max_bytes are numbers\n".into(),
                );
            };
            let options = VerifyOptions {
                sample,
                max_bytes,
                quarantine: param("quarantine").as_deref() == Some("true"),
            };
            let commands = Arc::clone(commands);
            tokio::task::spawn_blocking(move || {
                let Ok(_only) = commands.verifying.try_lock() else {
                    return Ok("a verify is running already; nothing done\n".to_string());
                };
                let lifecycle = cache.lifecycle();
                let forget = |digest: &crate::digest::Digest| lifecycle.forget(digest);
                let report = ops::verify_until(
                    cache.store(),
                    &options,
                    forget,
                    &commands.stopping,
                    &crate::progress::Silent,
                )?;
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
    let connecting = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        UnixStream::connect(socket),
    );
    let stream = connecting
        .await
        .map_err(|_| failed(&"no answer within 10 s"))?
        .map_err(|e| failed(&e))?;
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
