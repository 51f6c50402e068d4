//! The `regmirror` command: `serve`, `check-config`, the operator commands `warm`, `verify`,
//! `gc` and `ls`, and `health` for container health checks.

use clap::{Parser, Subcommand};
use http::Method;
use regmirror::app::{App, Live};
use regmirror::config::{parse_byte_size, Config, LogFormat};
use regmirror::progress::Progress;
use regmirror::tls::ServerTls;
use regmirror::warm::{self, Platforms};
use regmirror::{cache::store::Store, ops, server, signals, telemetry};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How often the TLS certificate files are checked for a replacement.
const CERTIFICATE_CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    version,
    about = "A pull-through caching mirror for OCI / Docker registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (without --config: a Docker Hub mirror on 0.0.0.0:5000, cache in ./regmirror-data).
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log one JSON object per line instead of text (same as log.format = "json").
        #[arg(long)]
        log_json: bool,
    },
    /// Validate a configuration file and print the effective configuration (secrets redacted).
    CheckConfig {
        /// TOML configuration file (the embedded default when absent).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Pre-pull images through the mirror's normal path (the running server's, else an
    /// in-process one on the same cache).
    Warm {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The mirror to pull through (default: the server of this configuration).
        #[arg(long)]
        server: Option<String>,
        /// Platforms of multi-platform images to fetch (`linux/amd64`); repeatable.
        #[arg(long = "platform", default_values_t = ["linux/amd64".to_string()])]
        platforms: Vec<String>,
        /// Fetch every platform.
        #[arg(long)]
        all_platforms: bool,
        /// Images: `alpine:3.20`, `docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:...`.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Re-hash stored content; delete (or quarantine) what does not match its digest.
    Verify {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Check only this many entries, picked at random.
        #[arg(long)]
        sample: Option<usize>,
        /// Stop after hashing this much (`10GiB`).
        #[arg(long)]
        max_bytes: Option<String>,
        /// Move corrupt content to <cache>/quarantine instead of deleting it.
        #[arg(long)]
        quarantine: bool,
    },
    /// Evict least recently used blobs now, down to a target (default: the low watermark).
    Gc {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Blob bytes to keep at most (`50GiB`).
        #[arg(long)]
        target: Option<String>,
    },
    /// List what is cached: tags, then objects by last use.
    Ls {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Exit 0 when the server answers its health check (for container HEALTHCHECKs).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:5000/healthz")]
        url: String,
        /// For an https:// URL: trust this CA (PEM) besides the system roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// For an https:// URL: do not verify the certificate (a liveness probe on loopback,
        /// where the certificate names the public host).
        #[arg(long)]
        insecure: bool,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => load(config.as_ref()).and_then(|c| {
            preflight(&c)?;
            print!("{}", c.to_redacted_toml());
            Ok(())
        }),
        Command::Serve { config, log_json } => load(config.as_ref()).and_then(|mut c| {
            if log_json {
                c.log.format = LogFormat::Json;
            }
            regmirror::allocator::keep_freed_buffers();
            let _log = telemetry::init(c.log.format, &c.log.level);
            runtime().block_on(serve(c, config.clone()))
        }),
        Command::Warm {
            config,
            server,
            platforms,
            all_platforms,
            images,
        } => {
            let _log = telemetry::init(LogFormat::Text, "warn");
            let platforms = if all_platforms {
                Platforms::All
            } else {
                Platforms::Only(platforms)
            };
            load(config.as_ref())
                .and_then(|c| runtime().block_on(warm_command(c, server, images, platforms)))
        }
        Command::Verify {
            config,
            sample,
            max_bytes,
            quarantine,
        } => load(config.as_ref()).and_then(|c| {
            let max_bytes = max_bytes.map(|m| parse_byte_size(&m)).transpose()?;
            if let Some(socket) = running_server(&c.cache.dir)? {
                let mut query = format!("/verify?quarantine={quarantine}");
                if let Some(n) = sample {
                    query.push_str(&format!("&sample={n}"));
                }
                if let Some(n) = max_bytes {
                    query.push_str(&format!("&max_bytes={n}"));
                }
                return through_server(&socket, Method::POST, &query);
            }
            let options = ops::VerifyOptions {
                sample,
                max_bytes,
                quarantine,
            };
            let progress = Progress::start("verify");
            let report =
                ops::verify(&c.cache.dir, &options, &progress).map_err(|e| e.to_string())?;
            progress.finish();
            print!("{}", report.render(quarantine));
            Ok(())
        }),
        Command::Gc { config, target } => load(config.as_ref()).and_then(|c| {
            let target = match (target, c.cache.max_size) {
                (Some(t), _) => parse_byte_size(&t)?,
                (None, Some(max)) => (max as f64 * c.cache.low_watermark) as u64,
                (None, None) => {
                    return Err("no --target and no cache.max_size to take one from".into())
                }
            };
            if let Some(socket) = running_server(&c.cache.dir)? {
                return through_server(&socket, Method::POST, &format!("/gc?target={target}"));
            }
            let progress = Progress::start("gc");
            let evicted = ops::gc(&c.cache.dir, target, &c.cache.pin, &progress)
                .map_err(|e| e.to_string())?;
            progress.finish();
            print!("{}", ops::render_gc(evicted));
            Ok(())
        }),
        Command::Ls { config } => load(config.as_ref()).and_then(|c| {
            if let Some(socket) = running_server(&c.cache.dir)? {
                return through_server(&socket, Method::GET, "/ls");
            }
            let (tags, objects) = ops::ls(&c.cache.dir).map_err(|e| e.to_string())?;
            print!("{}", ops::render_ls(&tags, &objects));
            Ok(())
        }),
        Command::Health {
            url,
            ca_file,
            insecure,
        } => runtime().block_on(health(&url, ca_file.as_deref(), insecure)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The admin socket of the server holding `dir`, if one does. A server without one (its bind
/// failed) is an error: acting on the directory behind its back would leave its figures wrong.
fn running_server(dir: &Path) -> Result<Option<PathBuf>, String> {
    if !Store::server_running(dir) {
        return Ok(None);
    }
    regmirror::admin::socket_of(dir).map(Some).ok_or_else(|| {
        format!(
            "a server holds {} but has no admin socket there (see its log); stop it to run this on the directory",
            dir.display()
        )
    })
}

/// Runs an operator command inside the running server and prints what it says.
fn through_server(socket: &Path, method: Method, query: &str) -> Result<(), String> {
    eprintln!("a server holds the cache directory: acting through it");
    let waiting = Progress::waiting("the server is at it");
    let output = runtime().block_on(regmirror::admin::command(socket, method, query));
    waiting.finish();
    print!("{}", output?);
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn serve(config: Config, path: Option<PathBuf>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let grace = config.server.shutdown_grace;
    let tls = match &config.server.tls {
        Some(files) => Some(Arc::new(
            ServerTls::load(files).map_err(|e| format!("server.tls: {e}"))?,
        )),
        None => None,
    };
    let app = App::new(config)?;
    let registries: Vec<&str> = app.routes().iter().map(|r| r.name.as_str()).collect();
    let usage = app.cache().lifecycle().usage();
    tracing::info!(
        listen = %local,
        cache = %app.config().cache.dir.display(),
        registries = ?registries,
        tls = tls.is_some(),
        auth = app.access().is_some(),
        blobs = usage.blobs,
        blob_bytes = usage.blob_bytes,
        "regmirror serving"
    );
    if !app.config().cache.warm.is_empty() {
        let (images, platforms) = (
            app.config().cache.warm.clone(),
            platforms_of(&app.config().cache.warm_platforms),
        );
        let default = default_registry(app.config());
        tokio::spawn(async move {
            let said = |line: &str| tracing::info!("{line}");
            let base = local_base(local);
            let warmed = warm::warm(
                &base,
                &images,
                &default,
                &platforms,
                &regmirror::progress::Silent,
                &said,
            );
            match warmed.await {
                Ok(s) => tracing::info!(
                    images = s.images,
                    blobs = s.blobs,
                    bytes = s.bytes,
                    "cache.warm done"
                ),
                Err(e) => tracing::error!(error = %e, "cache.warm failed"),
            }
        });
    }
    let live = Live::new(app);
    if let Some(tls) = &tls {
        tokio::spawn(Arc::clone(tls).watch(CERTIFICATE_CHECK_EVERY));
    }
    tokio::spawn(signals::reload_on_hangup(
        Arc::clone(&live),
        tls.clone(),
        move || load(path.as_ref()),
    ));
    server::run(listener, live, tls, signals::shutdown(), grace).await;
    Ok(())
}

async fn warm_command(
    config: Config,
    server: Option<String>,
    images: Vec<String>,
    platforms: Platforms,
) -> Result<(), String> {
    let default = default_registry(&config);
    let progress = Progress::start("warm");
    let said = |line: &str| progress.println(line);
    let pull = |base: String| {
        let (images, default, platforms) = (&images, &default, &platforms);
        let (progress, said) = (&progress, &said);
        async move { warm::warm(&base, images, default, platforms, progress, said).await }
    };
    let result = if let Some(base) = server {
        pull(base.trim_end_matches('/').to_string()).await
    } else if Store::server_running(&config.cache.dir) {
        pull(local_base(config.server.listen)).await
    } else {
        // No server on this cache: run one in-process for the duration.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let app = App::new(config)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(
            listener,
            Live::new(app),
            None,
            async {
                let _ = stopped.await;
            },
            std::time::Duration::from_secs(30),
        ));
        let result = pull(local_base(local)).await;
        let _ = stop.send(());
        let _ = server.await;
        result
    };
    progress.finish();
    result.map(|_| ())
}

/// Checks what `serve` would load besides the file itself: the certificate, the auth files, the
/// upstream CA files.
fn preflight(config: &Config) -> Result<(), String> {
    if let Some(files) = &config.server.tls {
        ServerTls::load(files).map_err(|e| format!("server.tls: {e}"))?;
    }
    if let Some(auth) = &config.auth {
        regmirror::access::Access::load(auth, &config.registry, Arc::default())?;
    }
    for registry in &config.registry {
        for upstream in &registry.upstream {
            regmirror::tls::client_config(upstream.ca_file.as_deref(), upstream.tls_verify)
                .map_err(|e| format!("upstream {}: ca_file {e}", upstream.url))?;
        }
    }
    Ok(())
}

async fn health(
    url: &str,
    ca_file: Option<&std::path::Path>,
    insecure: bool,
) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    let tls = regmirror::tls::client_config(ca_file, !insecure).map_err(|e| e.to_string())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .map_err(|_| format!("{url}: no answer within 5 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    match response.status() {
        http::StatusCode::OK => Ok(()),
        other => Err(format!("{url}: {other}")),
    }
}

fn platforms_of(names: &[String]) -> Platforms {
    if names.iter().any(|n| n == "all") {
        Platforms::All
    } else {
        Platforms::Only(names.to_vec())
    }
}

fn default_registry(config: &Config) -> String {
    config
        .registry
        .iter()
        .find(|r| r.default)
        .map_or_else(|| "docker.io".to_string(), |r| r.name.clone())
}

/// The URL to reach a server listening on `addr` from this machine.
fn local_base(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    format!("http://{host}:{}", addr.port())
}
