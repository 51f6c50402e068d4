//! Secrets in the configuration: never printed, never logged, and read from the file or the
//! environment variable a `*_file` / `*_env` key names.

use super::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A secret string: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    /// Read from the file or variable a `*_file` / `*_env` key names, rather than written in
    /// the configuration itself (so a configuration validated again after its secrets were
    /// loaded, as on a reload, does not count it as a second source).
    loaded: bool,
}

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret {
            value,
            loaded: false,
        }
    }

    /// A secret read from a file or an environment variable.
    pub fn loaded(value: String) -> Secret {
        Secret {
            value,
            loaded: true,
        }
    }

    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether it was written in the configuration itself.
    pub fn is_inline(&self) -> bool {
        !self.loaded
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
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

impl Secret {
    /// The first line of `path` (the file a `*_file` key named, `key` in errors).
    pub(super) fn from_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
        let line = text.lines().next().unwrap_or("").trim_end().to_string();
        Ok(Secret::loaded(line))
    }

    /// The value of `variable` (the one a `*_env` key named, `key` in errors).
    pub(super) fn from_env(key: &str, variable: &str) -> Result<Secret, ConfigError> {
        std::env::var(variable)
            .map(Secret::loaded)
            .map_err(|e| invalid(key, format!("environment variable {variable}: {e}")))
    }
}
