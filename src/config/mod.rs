//! Configuration: the TOML file (or the embedded default), parsed with unknown keys refused, then
//! validated so that every error names the key it is about.
//!
//! The keys `server.listen`, `cache.dir`, `registry.name`, `registry.default`,
//! `registry.upstream.url`, `.username`, `.password` and `.password_file` are a stable contract.
//! `config.example.toml` documents every key and is parsed by a test.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// The registries this mirror serves; the embedded default serves Docker Hub.
    #[serde(default = "default_registries")]
    pub registry: Vec<RegistryConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// Client authentication and access rules; absent, every client may pull everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// An S3-compatible bucket shared with other replicas, as a second cache level; absent,
    /// the mirror is a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_store: Option<SharedStoreConfig>,
    /// The other replicas sharing the bucket, so that each digest is fetched from upstream
    /// once for all of them; absent, this replica fetches its own misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// Who may pull what. Clients log in with Basic (an htpasswd user, or a token as the
/// password) or send `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The realm named in the `WWW-Authenticate` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// An htpasswd file of bcrypt entries (`htpasswd -B`), re-read on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<PathBuf>,
    /// A file of static tokens, one `<user> <token>` per line, re-read on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// What clients without credentials may pull (patterns as in `rule.allow`); nothing if empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anonymous: Vec<String>,
    /// What signed-in users may pull. Without rules, every signed-in user may pull everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule: Vec<AccessRule>,
}

/// One access rule: these users may pull repositories matching these patterns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// User names, or `"*"` for every signed-in user.
    pub users: Vec<String>,
    /// `registry/repository` patterns where `*` matches any characters, `/` included:
    /// `docker.io/library/*`, `ghcr.io/myorg/*`, `*`. A pattern without a registry host
    /// (`library/*`) means the default registry.
    pub allow: Vec<String>,
}

fn default_realm() -> String {
    "regmirror".to_string()
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` (one object per line) for log pipelines.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// Level filter (`info`, `debug`, `regmirror=debug,hyper=info`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".to_string()
}

/// How the mirror listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to accept clients on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT, how long responses and downloads in flight may take to finish (one
    /// deadline for both) before the process exits.
    #[serde(default = "default_shutdown_grace", with = "duration_text")]
    pub shutdown_grace: Duration,
    /// Status for requests naming a registry that is not configured: 404 (clients fall back to
    /// the next mirror or the origin) or 403. regmirror never proxies unconfigured registries.
    #[serde(default = "default_unknown_registry_status")]
    pub unknown_registry_status: u16,
    /// Time a client gets to send a request's headers, and the longest an HTTP/1.1 connection
    /// may wait between requests (a slow client cannot hold a connection).
    #[serde(default = "default_header_timeout", with = "duration_text")]
    pub header_timeout: Duration,
    /// A connection whose client takes nothing of what it is sent for this long (it stopped
    /// reading, or keeps its HTTP/2 window shut) is closed.
    #[serde(default = "default_send_timeout", with = "duration_text")]
    pub send_timeout: Duration,
    /// A connection with no request in progress for this long is closed (HTTP/2 included).
    #[serde(default = "default_idle_timeout", with = "duration_text")]
    pub idle_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may carry before it is closed (gracefully: the client reconnects).
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u64,
    /// What the blob body windows of one HTTP/2 connection may hold at once: each stream takes
    /// one window's share for its whole life; a stream not yet begun waits for one.
    #[serde(default = "default_h2_window_memory", with = "byte_size")]
    pub h2_window_memory: u64,
    /// Serve HTTPS with these PEM files instead of plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// The listener's certificate. The files are watched and reloaded when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Where and how content is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The cache directory (created if missing). Holds `blobs/`, `tags/` and `tmp/`.
    #[serde(default = "default_cache_dir")]
    pub dir: PathBuf,
    /// How long a tag's digest is trusted before it is revalidated with a HEAD upstream.
    #[serde(default = "default_tag_ttl", with = "duration_text")]
    pub tag_ttl: Duration,
    /// Upper bound on one blob download from upstream, whoever waits for it.
    #[serde(default = "default_fill_timeout", with = "duration_text")]
    pub fill_timeout: Duration,
    /// Memory for recently served manifests, in MiB (they are small and asked for often).
    #[serde(default = "default_manifest_memory_mib")]
    pub manifest_memory_mib: u64,
    /// When a client's request for a layer starts a download, the rest of its image (as its
    /// manifest, fetched from upstream lately, lists it) is downloaded ahead of the client,
    /// this many blobs at once across all images; 0 turns it off.
    #[serde(default = "default_prefetch_downloads")]
    pub prefetch_downloads: usize,
    /// Blob downloads from upstream at once, clients' and prefetches' together; more wait
    /// for a slot (each running download holds two blocking threads and two open files).
    #[serde(default = "default_max_downloads")]
    pub max_downloads: usize,
    /// Disk budget for blobs (`"200GiB"`); unlimited when absent. Manifests and tag records
    /// are small and not counted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "byte_size_opt"
    )]
    pub max_size: Option<u64>,
    /// When blobs use more than this share of `max_size`, the least recently used are evicted...
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
    /// ...down to this share.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// Images never evicted: `registry/repository:tag` or `registry/repository@digest`
    /// (the index, the platform manifests pulled so far, their configs and layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// Images pulled through the mirror at start-up (`docker.io/library/alpine:3.20`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<String>,
    /// Platforms `warm` fetches of multi-platform images (`linux/amd64`, or `all`).
    #[serde(default = "default_warm_platforms")]
    pub warm_platforms: Vec<String>,
}

/// One registry the mirror serves, such as `docker.io`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry's host name as clients spell it in image references.
    pub name: String,
    /// Serve this registry at bare `/v2/<name>/...` paths (dockerd's `registry-mirrors`).
    #[serde(default)]
    pub default: bool,
    /// Where content comes from, in order of preference.
    pub upstream: Vec<UpstreamConfig>,
    /// The longest back-off of an endpoint after outages (connection, timeout, 5xx, stalled
    /// body): about a second after the first, doubling with each failed probe up to this.
    /// While it backs off it is skipped when another endpoint may answer, and probed by one
    /// request at a time when none can.
    #[serde(default = "default_failover_cooldown", with = "duration_text")]
    pub failover_cooldown: Duration,
    /// Let endpoints with `resolve_tags = false` answer for tags when no trusted one can.
    /// Off by default: a public mirror may serve stale or forged tags, never unverifiable bytes.
    #[serde(default)]
    pub allow_untrusted_tags: bool,
}

/// One upstream endpoint of a registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, `https://host[:port][/path]` (or `http://` for a LAN registry).
    pub url: String,
    /// Account for the upstream's token or basic authentication; anonymous when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The account's password or access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A file holding the password (first line), so it stays out of the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Time allowed to open a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to its response headers (a token: to its body).
    #[serde(default = "default_response_timeout", with = "duration_text")]
    pub response_timeout: Duration,
    /// A body that delivers no byte for this long is abandoned.
    #[serde(default = "default_stall_timeout", with = "duration_text")]
    pub stall_timeout: Duration,
    /// Whether this endpoint may say which digest a tag points to. Content by digest is
    /// verified and may come from any endpoint; set `false` for public mirrors.
    #[serde(default = "default_true")]
    pub resolve_tags: bool,
    /// An environment variable holding the password, so it stays out of files altogether.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Extra CA certificates (PEM) trusted for this endpoint besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Verify the endpoint's TLS certificate. `false` trusts any certificate (logged loudly at
    /// every start and reload); meant for a lab registry, never for a public one.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: ServerConfig::default(),
            cache: CacheConfig::default(),
            registry: default_registries(),
            log: LogConfig::default(),
            auth: None,
            shared_store: None,
            cluster: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            shutdown_grace: default_shutdown_grace(),
            unknown_registry_status: default_unknown_registry_status(),
            header_timeout: default_header_timeout(),
            send_timeout: default_send_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_requests_per_connection: default_max_requests_per_connection(),
            h2_window_memory: default_h2_window_memory(),
            tls: None,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_cache_dir(),
            tag_ttl: default_tag_ttl(),
            fill_timeout: default_fill_timeout(),
            manifest_memory_mib: default_manifest_memory_mib(),
            prefetch_downloads: default_prefetch_downloads(),
            max_downloads: default_max_downloads(),
            max_size: None,
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            pin: Vec::new(),
            warm: Vec::new(),
            warm_platforms: default_warm_platforms(),
        }
    }
}

impl UpstreamConfig {
    /// An anonymous upstream with default timeouts.
    pub fn new(url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            username: None,
            password: None,
            password_file: None,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            stall_timeout: default_stall_timeout(),
            resolve_tags: true,
            password_env: None,
            ca_file: None,
            tls_verify: true,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("./regmirror-data")
}
fn default_tag_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_fill_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_manifest_memory_mib() -> u64 {
    64
}
fn default_prefetch_downloads() -> usize {
    4
}
fn default_max_downloads() -> usize {
    64
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_warm_platforms() -> Vec<String> {
    vec!["linux/amd64".to_string()]
}
fn default_high_watermark() -> f64 {
    0.95
}
fn default_low_watermark() -> f64 {
    0.85
}
fn default_failover_cooldown() -> Duration {
    Duration::from_secs(15)
}
fn default_true() -> bool {
    true
}
fn default_unknown_registry_status() -> u16 {
    404
}
/// Far above what one process can serve; a typo guard.
const MAX_CONNECTIONS: usize = 1_000_000;
/// More downloads ahead of clients than this would only compete with the clients' own.
const MAX_PREFETCH_DOWNLOADS: usize = 64;
/// Each download holds two blocking threads: 128 of them leave the other half of tokio's 512
/// to lookups, cold reads and DNS, which no number of downloads can then starve.
pub const MAX_DOWNLOADS: usize = 128;

fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_requests_per_connection() -> u64 {
    10_000
}
fn default_h2_window_memory() -> u64 {
    16 << 20
}
fn default_registries() -> Vec<RegistryConfig> {
    vec![RegistryConfig::new(
        "docker.io",
        true,
        vec![UpstreamConfig::new("https://registry-1.docker.io")],
    )]
}

impl RegistryConfig {
    /// A registry with default failover settings.
    pub fn new(
        name: impl Into<String>,
        default: bool,
        upstream: Vec<UpstreamConfig>,
    ) -> RegistryConfig {
        RegistryConfig {
            name: name.into(),
            default,
            upstream,
            failover_cooldown: default_failover_cooldown(),
            allow_untrusted_tags: false,
        }
    }
}

mod cluster;
mod secret;
mod shared;
mod units;
mod validate;
pub use cluster::{peer_address, ClusterConfig};
pub use secret::Secret;
pub use shared::{SharedStoreConfig, MAX_SHARED_UPLOADS};
use units::{byte_size, byte_size_opt, duration_text};
pub use units::{format_byte_size, parse_byte_size};

#[cfg(test)]
mod tests;
