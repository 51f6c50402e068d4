//! `[shared_store]`: the S3-compatible bucket several replicas share as their second cache
//! level. The keys `url`, `endpoint`, `region`, `access_key_id`, `secret_access_key`,
//! `secret_access_key_file`, `secret_access_key_env` and `allow_http` are a stable contract.

use super::{duration_text, invalid, ConfigError, Secret};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Uploads to the bucket at once, at most.
pub const MAX_SHARED_UPLOADS: usize = 32;

/// Where the shared bucket is and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStoreConfig {
    /// `s3://<bucket>/<key prefix>`: every object of this cache lives under the prefix.
    pub url: String,
    /// The S3 API's base URL (`http://garage.lan:3900`); omit it for AWS. Requests are
    /// path-style (`<endpoint>/<bucket>/<key>`) when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region requests are signed for (`garage` for Garage; any name for most servers).
    #[serde(default = "default_region")]
    pub region: String,
    /// The access key's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// The secret key (prefer `secret_access_key_file` or `secret_access_key_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// A file holding the secret key (its first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// An environment variable holding the secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
    /// Allow an `http://` endpoint (a bucket on the LAN without TLS).
    #[serde(default)]
    pub allow_http: bool,
    /// A PEM file of CA certificates trusted for the endpoint, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long one request to the bucket may take until its answer's headers; a request
    /// that sends a body (an upload) gets one more second per 256 KiB of it.
    #[serde(default = "default_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// How long connecting to the bucket may take.
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// How long a blob read from the bucket may go without a byte before the rest comes from
    /// upstream.
    #[serde(default = "default_stall_timeout", with = "duration_text")]
    pub stall_timeout: Duration,
    /// After a failed request, downloads skip the bucket this long before trying it again (a
    /// bucket that hangs costs one miss its `timeout`, not every miss).
    #[serde(default = "default_recheck_after", with = "duration_text")]
    pub recheck_after: Duration,
    /// Uploads to the bucket at once; more wait their turn (beyond 1024 waiting, newer ones
    /// are dropped: the content stays local, and the next replica to fetch it uploads it).
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
}

fn default_region() -> String {
    "us-east-1".to_string()
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_recheck_after() -> Duration {
    Duration::from_secs(10)
}
fn default_max_uploads() -> usize {
    4
}

impl SharedStoreConfig {
    /// The bucket and the key prefix (without slashes at its ends; may be empty) of `url`.
    pub fn bucket_and_prefix(&self) -> Result<(String, String), ConfigError> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            invalid(
                "shared_store.url",
                format!("{:?} must look like s3://<bucket>/<prefix>", self.url),
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(invalid(
                "shared_store.url",
                format!("{bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"),
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(invalid(
                "shared_store.url",
                format!("{prefix:?} is not a key prefix"),
            ));
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.bucket_and_prefix()?;
        if let Some(endpoint) = &self.endpoint {
            let uri: http::Uri = endpoint.parse().map_err(|e| {
                invalid(
                    "shared_store.endpoint",
                    format!("{endpoint:?} is not a URL: {e}"),
                )
            })?;
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) || uri.query().is_some() {
                return Err(invalid(
                    "shared_store.endpoint",
                    "must not carry credentials or a query (use access_key_id and a secret)",
                ));
            }
            match uri.scheme_str() {
                Some("https") => {}
                Some("http") if self.allow_http => {}
                Some("http") => {
                    return Err(invalid(
                        "shared_store.endpoint",
                        format!("{endpoint:?} is plain HTTP: set allow_http = true to allow it"),
                    ))
                }
                _ => {
                    return Err(invalid(
                        "shared_store.endpoint",
                        format!("{endpoint:?} must start with http:// or https://"),
                    ))
                }
            }
        }
        let secrets = [
            self.secret_access_key
                .as_ref()
                .is_some_and(Secret::is_inline),
            self.secret_access_key_file.is_some(),
            self.secret_access_key_env.is_some(),
        ];
        if secrets.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(
                "shared_store.secret_access_key",
                "set one of secret_access_key, secret_access_key_file and secret_access_key_env",
            ));
        }
        if self.access_key_id.is_some() != secrets.contains(&true) {
            return Err(invalid(
                "shared_store.access_key_id",
                "an access key needs both its id and its secret",
            ));
        }
        for (key, value) in [
            ("shared_store.timeout", self.timeout),
            ("shared_store.connect_timeout", self.connect_timeout),
            ("shared_store.stall_timeout", self.stall_timeout),
            ("shared_store.recheck_after", self.recheck_after),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if !(1..=MAX_SHARED_UPLOADS).contains(&self.max_uploads) {
            return Err(invalid(
                "shared_store.max_uploads",
                format!("must be between 1 and {MAX_SHARED_UPLOADS}"),
            ));
        }
        Ok(())
    }

    /// Replaces `secret_access_key_file` or `secret_access_key_env` by the secret it holds.
    pub(super) fn load_secret(&mut self) -> Result<(), ConfigError> {
        if let Some(file) = &self.secret_access_key_file {
            let key = "shared_store.secret_access_key_file";
            self.secret_access_key = Some(Secret::from_file(key, file)?);
        }
        if let Some(variable) = &self.secret_access_key_env {
            let key = "shared_store.secret_access_key_env";
            self.secret_access_key = Some(Secret::from_env(key, variable)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> SharedStoreConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_url_names_a_bucket_and_a_prefix() {
        let c = parsed("url = \"s3://regmirror-cache/prod/\"");
        assert_eq!(
            c.bucket_and_prefix().unwrap(),
            ("regmirror-cache".into(), "prod".into())
        );
        let c = parsed("url = \"s3://regmirror-cache\"");
        assert_eq!(c.bucket_and_prefix().unwrap().1, "");
        for bad in [
            "http://bucket/x",
            "s3://UPPER/x",
            "s3://ab/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
        ] {
            let c = parsed(&format!("url = \"{bad}\""));
            assert!(c.validate().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plain_http_and_half_keys_are_refused() {
        let c = parsed("url = \"s3://bucket/x\"\nendpoint = \"http://127.0.0.1:3900\"");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("shared_store.endpoint") && e.contains("allow_http"),
            "{e}"
        );
        let c = parsed(
            "url = \"s3://bucket/x\"\nendpoint = \"http://127.0.0.1:3900\"\nallow_http = true",
        );
        c.validate().unwrap();
        let c = parsed("url = \"s3://bucket/x\"\naccess_key_id = \"GK1\"");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("shared_store.access_key_id"), "{e}");
        let c = parsed(
            "url = \"s3://bucket/x\"\naccess_key_id = \"GK1\"\nsecret_access_key = \"s\"\nsecret_access_key_env = \"S\"",
        );
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_secret_comes_from_a_file_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s3.secret");
        std::fs::write(&file, "very-secret-key\n").unwrap();
        let mut c = parsed(&format!(
            "url = \"s3://bucket/x\"\naccess_key_id = \"GK1\"\nsecret_access_key_file = {:?}",
            file
        ));
        c.validate().unwrap();
        c.load_secret().unwrap();
        assert_eq!(
            c.secret_access_key.as_ref().map(Secret::expose),
            Some("very-secret-key")
        );
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(!shown.contains("very-secret-key"), "{shown}");
        // Validated again once loaded, as on a reload: one source still.
        c.validate().unwrap();
    }
}
