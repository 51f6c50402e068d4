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
    /// A connection with no request in progress for this long is closed (HTTP/2 included).
    #[serde(default = "default_idle_timeout", with = "duration_text")]
    pub idle_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may carry before it is closed (gracefully: the client reconnects).
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u64,
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

/// A secret string: never printed, never logged.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
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
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_requests_per_connection: default_max_requests_per_connection(),
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

impl Config {
    /// Reads, parses and validates a file; secrets in `password_file`s are loaded.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        config.load_secrets()
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.registry.is_empty() {
            return Err(invalid("registry", "at least one [[registry]] is required"));
        }
        let defaults = self.registry.iter().filter(|r| r.default).count();
        if defaults > 1 {
            return Err(invalid(
                "registry.default",
                "only one registry may be the default",
            ));
        }
        if !matches!(self.server.unknown_registry_status, 403 | 404) {
            return Err(invalid(
                "server.unknown_registry_status",
                "must be 403 or 404",
            ));
        }
        for (name, value) in [
            ("server.header_timeout", self.server.header_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "must be greater than zero"));
            }
        }
        if self.server.max_connections == 0 || self.server.max_connections > MAX_CONNECTIONS {
            return Err(invalid(
                "server.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        if self.cache.prefetch_downloads > MAX_PREFETCH_DOWNLOADS {
            return Err(invalid(
                "cache.prefetch_downloads",
                format!("must be at most {MAX_PREFETCH_DOWNLOADS}"),
            ));
        }
        if self.server.max_requests_per_connection == 0 {
            return Err(invalid(
                "server.max_requests_per_connection",
                "must be at least 1",
            ));
        }
        if let Some(auth) = &self.auth {
            auth.validate(self)?;
        }
        let (high, low) = (self.cache.high_watermark, self.cache.low_watermark);
        if !(low > 0.0 && low < high && high <= 1.0) {
            return Err(invalid(
                "cache.low_watermark",
                format!("watermarks must satisfy 0 < low_watermark ({low}) < high_watermark ({high}) <= 1"),
            ));
        }
        if self.cache.max_size == Some(0) {
            return Err(invalid(
                "cache.max_size",
                "must be greater than zero (omit it for no limit)",
            ));
        }
        for (i, pin) in self.cache.pin.iter().enumerate() {
            let parsed = crate::oci::ImageRef::parse(pin, None);
            let configured =
                parsed.is_some_and(|p| self.registry.iter().any(|r| r.name == p.registry));
            if !configured {
                return Err(invalid(
                    format!("cache.pin[{i}]"),
                    format!("{pin:?} must start with a configured registry, e.g. docker.io/library/alpine:3.20"),
                ));
            }
        }
        if self.cache.manifest_memory_mib == 0 {
            return Err(invalid("cache.manifest_memory_mib", "must be at least 1"));
        }
        for (i, registry) in self.registry.iter().enumerate() {
            let key = format!("registry[{i}]");
            if !crate::oci::is_host_name(&registry.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is not a registry host name", registry.name),
                ));
            }
            if self.registry[..i].iter().any(|r| r.name == registry.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("registry {:?} is configured twice", registry.name),
                ));
            }
            if registry.upstream.is_empty() {
                return Err(invalid(
                    format!("{key}.upstream"),
                    "at least one [[registry.upstream]] is required",
                ));
            }
            for (j, upstream) in registry.upstream.iter().enumerate() {
                upstream.validate(&format!("{key}.upstream[{j}]"))?;
            }
            if !registry.allow_untrusted_tags && !registry.upstream.iter().any(|u| u.resolve_tags) {
                return Err(invalid(
                    format!("{key}.upstream"),
                    "no endpoint may resolve tags: set resolve_tags = true on one, or allow_untrusted_tags = true",
                ));
            }
        }
        Ok(())
    }

    /// Replaces each `password_file` by the password it holds.
    pub fn load_secrets(mut self) -> Result<Config, ConfigError> {
        for (i, registry) in self.registry.iter_mut().enumerate() {
            for (j, upstream) in registry.upstream.iter_mut().enumerate() {
                if let Some(file) = &upstream.password_file {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        invalid(
                            format!("registry[{i}].upstream[{j}].password_file"),
                            format!("cannot read {}: {e}", file.display()),
                        )
                    })?;
                    let line = text.lines().next().unwrap_or("").trim_end().to_string();
                    upstream.password = Some(Secret::new(line));
                }
                if let Some(variable) = &upstream.password_env {
                    let value = std::env::var(variable).map_err(|e| {
                        invalid(
                            format!("registry[{i}].upstream[{j}].password_env"),
                            format!("environment variable {variable}: {e}"),
                        )
                    })?;
                    upstream.password = Some(Secret::new(value));
                }
            }
        }
        Ok(self)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl UpstreamConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let uri: http::Uri = self.url.parse().map_err(|e| {
            invalid(
                format!("{key}.url"),
                format!("{:?} is not a URL: {e}", self.url),
            )
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(invalid(
                    format!("{key}.url"),
                    format!("{:?} must start with http:// or https://", self.url),
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid(
                format!("{key}.url"),
                format!("{:?} has no host", self.url),
            ));
        }
        if uri.query().is_some() || self.url.contains('@') {
            return Err(invalid(
                format!("{key}.url"),
                "must not carry a query or credentials (use username / password)",
            ));
        }
        let sources = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        let has_password = sources.contains(&true);
        if sources.iter().filter(|set| **set).count() > 1 {
            return Err(invalid(
                format!("{key}.password_file"),
                "set one of password, password_file and password_env",
            ));
        }
        if self.username.is_some() != has_password {
            return Err(invalid(
                format!("{key}.username"),
                "username and password (or password_file / password_env) go together",
            ));
        }
        if self.ca_file.is_some() && !self.tls_verify {
            return Err(invalid(
                format!("{key}.ca_file"),
                "ca_file has no use with tls_verify = false",
            ));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("stall_timeout", self.stall_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    format!("{key}.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

impl AuthConfig {
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        if self.htpasswd.is_none() && self.tokens_file.is_none() {
            return Err(invalid(
                "auth",
                "name an htpasswd file, a tokens_file, or both (remove [auth] to let everyone pull)",
            ));
        }
        if self.realm.is_empty()
            || self.realm.contains(['"', '\\'])
            || self.realm.chars().any(char::is_control)
        {
            return Err(invalid(
                "auth.realm",
                "must be non-empty text without quotes",
            ));
        }
        let patterns = self
            .anonymous
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("auth.anonymous[{i}]"), p))
            .chain(self.rule.iter().enumerate().flat_map(|(i, rule)| {
                rule.allow
                    .iter()
                    .enumerate()
                    .map(move |(j, p)| (format!("auth.rule[{i}].allow[{j}]"), p))
            }));
        for (key, pattern) in patterns {
            crate::access::Pattern::parse(pattern, &config.registry)
                .map_err(|e| invalid(key, e))?;
        }
        for (i, rule) in self.rule.iter().enumerate() {
            if rule.users.is_empty() || rule.users.iter().any(|u| u.is_empty()) {
                return Err(invalid(
                    format!("auth.rule[{i}].users"),
                    "list at least one user name (or \"*\")",
                ));
            }
        }
        Ok(())
    }
}

/// Parses a size such as `"200GiB"`, `"500 MB"` or `"1048576"` into bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    Ok((value * multiplier as f64) as u64)
}

/// A size for people: `1.5 KiB`, `293.0 MiB`.
pub fn format_byte_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Optional sizes as text (`"200GiB"`) or a number of bytes.
mod byte_size_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(size: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match size {
            Some(n) if n % (1 << 30) == 0 => s.serialize_str(&format!("{}GiB", n >> 30)),
            Some(n) if n % (1 << 20) == 0 => s.serialize_str(&format!("{}MiB", n >> 20)),
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Some(n)),
            Raw::Text(t) => super::parse_byte_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Durations as human text (`"60s"`, `"5m"`, `"1h 30m"`).
mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_a_docker_hub_mirror() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(c.cache.dir, PathBuf::from("./regmirror-data"));
        assert_eq!(c.registry.len(), 1);
        assert!(c.registry[0].default);
        assert_eq!(
            c.registry[0].upstream[0].url,
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn contract_keys_parse() {
        let c = Config::parse(
            r#"
            [server]
            listen = "127.0.0.1:5000"
            [cache]
            dir = "/var/lib/regmirror"
            [[registry]]
            name = "docker.io"
            default = true
            [[registry.upstream]]
            url = "https://registry-1.docker.io"
            username = "u"
            password = "p"
            "#,
        )
        .unwrap();
        assert_eq!(c.cache.dir, PathBuf::from("/var/lib/regmirror"));
        assert_eq!(
            c.registry[0].upstream[0]
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "p"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("[server]\nlisten_addr = \"1.2.3.4:5\"\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("[cache]\ntag_ttl = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("tag_ttl"), "{e}");
        let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"ftp://x\"\n";
        let e = Config::parse(text).unwrap_err();
        assert!(e.to_string().contains("registry[0].upstream[0].url"), "{e}");
        let text = "[[registry]]\nname = \"x.io\"\nupstream = []\n";
        assert!(Config::parse(text)
            .unwrap_err()
            .to_string()
            .contains("registry[0].upstream"));
        let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"https://x\"\nusername = \"u\"\n";
        assert!(Config::parse(text)
            .unwrap_err()
            .to_string()
            .contains("username"));
    }

    #[test]
    fn sizes_and_watermarks() {
        assert_eq!(parse_byte_size("200GiB"), Ok(200 << 30));
        assert_eq!(parse_byte_size("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert!(parse_byte_size("12 parsecs").is_err());
        let c = Config::parse("[cache]\nmax_size = \"10MiB\"\n").unwrap();
        assert_eq!(c.cache.max_size, Some(10 << 20));
        assert!(c.to_redacted_toml().contains("10MiB"));
        let e = Config::parse("[cache]\nmax_size = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("max_size"), "{e}");
        let e = Config::parse("[cache]\nhigh_watermark = 0.5\nlow_watermark = 0.6\n").unwrap_err();
        assert!(e.to_string().contains("watermark"), "{e}");
        let e = Config::parse("[cache]\npin = [\"quay.io/x:1\"]\n").unwrap_err();
        assert!(e.to_string().contains("cache.pin[0]"), "{e}");
        let e = Config::parse("[cache]\nprefetch_downloads = 100000\n").unwrap_err();
        assert!(e.to_string().contains("cache.prefetch_downloads"), "{e}");
        let c = Config::parse("[cache]\nprefetch_downloads = 0\n").unwrap();
        assert_eq!(c.cache.prefetch_downloads, 0);
    }

    #[test]
    fn secrets_are_redacted() {
        let text = "[[registry]]\nname = \"x.io\"\n[[registry.upstream]]\nurl = \"https://x\"\nusername = \"u\"\npassword = \"hunter2\"\n";
        let c = Config::parse(text).unwrap();
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let c = Config::parse(&text).unwrap();
        assert!(c.registry.iter().any(|r| r.default));
    }
}
