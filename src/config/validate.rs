//! Loading a configuration file and checking what types alone cannot: every error names the
//! key it is about.

use super::*;

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
            ("server.send_timeout", self.server.send_timeout),
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
        if self.cache.max_downloads == 0 || self.cache.max_downloads > MAX_DOWNLOADS {
            return Err(invalid(
                "cache.max_downloads",
                format!("must be between 1 and {MAX_DOWNLOADS}"),
            ));
        }
        if self.cache.prefetch_downloads > MAX_PREFETCH_DOWNLOADS {
            return Err(invalid(
                "cache.prefetch_downloads",
                format!("must be at most {MAX_PREFETCH_DOWNLOADS}"),
            ));
        }
        if self.server.h2_window_memory < 1 << 20 {
            return Err(invalid(
                "server.h2_window_memory",
                "must be at least 1MiB (one window)",
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
        if let Some(shared) = &self.shared_store {
            shared.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
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

    /// Replaces each `password_file` (and the shared store's secret file or variable) by the
    /// secret it holds.
    pub fn load_secrets(mut self) -> Result<Config, ConfigError> {
        if let Some(shared) = &mut self.shared_store {
            shared.load_secret()?;
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.load_secret()?;
        }
        for (i, registry) in self.registry.iter_mut().enumerate() {
            for (j, upstream) in registry.upstream.iter_mut().enumerate() {
                let key = format!("registry[{i}].upstream[{j}]");
                if let Some(file) = &upstream.password_file {
                    let key = format!("{key}.password_file");
                    upstream.password = Some(Secret::from_file(&key, file)?);
                }
                if let Some(variable) = &upstream.password_env {
                    let key = format!("{key}.password_env");
                    upstream.password = Some(Secret::from_env(&key, variable)?);
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
            self.password.as_ref().is_some_and(Secret::is_inline),
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
