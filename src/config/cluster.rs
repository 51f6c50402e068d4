//! `[cluster]`: the replicas that share one bucket and know each other, so that each digest is
//! fetched from upstream by one of them (its owner) for the whole fleet. The keys `self`,
//! `peers`, `peers_dns` and `secret_file` are a stable contract.

use super::{duration_text, invalid, ConfigError, Secret};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The longest `timeout`, `stall_timeout` and `recheck_after` accepted.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The shortest cluster secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// This replica and its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's own address as its peers reach it (`http://10.0.0.11:5000`); one of
    /// `peers`. Without it, the peer whose host's first label is this machine's host name's
    /// (`regmirror-0` in `http://regmirror-0.regmirror-peers:5000`, as a StatefulSet's pods
    /// are named): one configuration for every replica.
    #[serde(rename = "self", default, skip_serializing_if = "Option::is_none")]
    pub self_url: Option<String>,
    /// Every replica's address, this one's included; the same list on every replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Instead of `peers`: a name and port (`regmirror-peers.cache.svc.cluster.local:5000`,
    /// or with `http://` or `https://` before it) whose every address is a peer, looked up
    /// again every `recheck_after` (a Kubernetes headless Service). Without `self`, this
    /// replica is the address that is one of this machine's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_dns: Option<String>,
    /// A file holding the secret peers sign their requests with (its first line; at least 16
    /// bytes): peers accept cluster requests only when signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The secret itself (prefer `secret_file` or `secret_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// An environment variable holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// How long a peer may take to answer a request's headers (the owner of a blob answers
    /// once upstream has); a peer that does not is skipped, and the next owner or upstream
    /// asked.
    #[serde(default = "default_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// How long a blob from a peer may go without a byte before the rest comes from upstream.
    #[serde(default = "default_stall_timeout", with = "duration_text")]
    pub stall_timeout: Duration,
    /// After a peer failed to answer, it is skipped this long before it is asked again.
    #[serde(default = "default_recheck_after", with = "duration_text")]
    pub recheck_after: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_recheck_after() -> Duration {
    Duration::from_secs(10)
}

/// A peer's address as compared and hashed: without a trailing slash.
pub fn peer_address(url: &str) -> &str {
    url.trim_end_matches('/')
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, peer) in self.peers.iter().enumerate() {
            let uri: http::Uri = peer.parse().map_err(|e| {
                invalid(
                    format!("cluster.peers[{i}]"),
                    format!("{peer:?} is not a URL: {e}"),
                )
            })?;
            let plain = matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
                && uri.query().is_none()
                && matches!(uri.path(), "" | "/");
            if !plain {
                return Err(invalid(
                    format!("cluster.peers[{i}]"),
                    format!("{peer:?} must be http(s)://host:port, nothing more"),
                ));
            }
        }
        match (&self.peers_dns, self.peers.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    "cluster.peers_dns",
                    "set either peers or peers_dns, not both",
                ))
            }
            (Some(name), true) => {
                self.dns_name().ok_or_else(|| {
                    invalid(
                        "cluster.peers_dns",
                        format!(
                            "{name:?} must be host:port (http:// or https:// before it at most)"
                        ),
                    )
                })?;
                if self.self_url.is_some() && self.dns_self_ip().is_none() {
                    return Err(invalid(
                        "cluster.self",
                        "with peers_dns, it is this replica's address as the name gives it: \
                         the same scheme and port, and an IP address (http://10.0.0.11:5000)",
                    ));
                }
            }
            (None, true) => {
                return Err(invalid(
                    "cluster.peers",
                    "lists every replica, this one's included (or set peers_dns)",
                ))
            }
            (None, false) => {}
        }
        if let (Some(own), None) = (&self.self_url, &self.peers_dns) {
            let own = peer_address(own);
            if !self.peers.iter().any(|p| peer_address(p) == own) {
                return Err(invalid(
                    "cluster.self",
                    format!("{own:?} is not one of cluster.peers"),
                ));
            }
        }
        let secrets = [
            self.secret.as_ref().is_some_and(Secret::is_inline),
            self.secret_file.is_some(),
            self.secret_env.is_some(),
        ];
        match secrets.iter().filter(|s| **s).count() {
            0 if self.secret.is_none() => {
                return Err(invalid(
                    "cluster.secret_file",
                    "peers need a shared secret: set secret_file (or secret_env)",
                ))
            }
            0 | 1 => {}
            _ => {
                return Err(invalid(
                    "cluster.secret",
                    "set one of secret, secret_file and secret_env",
                ))
            }
        }
        if let Some(secret) = &self.secret {
            if secret.expose().len() < MIN_SECRET_BYTES {
                return Err(invalid(
                    "cluster.secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
        }
        for (key, value) in [
            ("cluster.timeout", self.timeout),
            ("cluster.stall_timeout", self.stall_timeout),
            ("cluster.recheck_after", self.recheck_after),
        ] {
            if value.is_zero() || value > MAX_DURATION {
                return Err(invalid(key, "must be greater than zero, and a day at most"));
            }
        }
        Ok(())
    }

    /// `peers_dns` taken apart: the scheme (`http` unless given), the host name and the port.
    pub fn dns_name(&self) -> Option<(&str, &str, u16)> {
        let text = self.peers_dns.as_deref()?.trim_end_matches('/');
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            Some(_) => return None,
            None => ("http", text),
        };
        let (host, port) = rest.rsplit_once(':')?;
        let plain = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && port.bytes().all(|b| b.is_ascii_digit());
        let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
        Some((scheme, host, port)).filter(|_| plain)
    }

    /// With `peers_dns`, the address `self` names (`http://10.0.0.11:5000`): which of the
    /// addresses looked up is this replica. `None` without `self` (or when it is not that).
    pub fn dns_self_ip(&self) -> Option<std::net::IpAddr> {
        let (scheme, _, port) = self.dns_name()?;
        let uri: http::Uri = peer_address(self.self_url.as_deref()?).parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let same = uri.scheme_str() == Some(scheme) && uri.port_u16() == Some(port);
        host.parse().ok().filter(|_| same)
    }

    /// This replica's address among the peers: `self`, or the one peer named after
    /// `hostname` (their hosts' first labels equal).
    pub fn own_address(&self, hostname: &str) -> Result<&str, ConfigError> {
        if let Some(own) = &self.self_url {
            return Ok(peer_address(own));
        }
        let hostname = hostname.split('.').next().unwrap_or("");
        let named: Vec<&str> = self
            .peers
            .iter()
            .map(|p| peer_address(p))
            .filter(|p| {
                let host = p.split("://").nth(1).unwrap_or("");
                let first = host.split(['.', ':']).next().unwrap_or("");
                !hostname.is_empty() && first.eq_ignore_ascii_case(hostname)
            })
            .collect();
        match named[..] {
            [own] => Ok(own),
            _ => {
                Err(invalid(
                    "cluster.self",
                    format!(
                    "not set, and {} of cluster.peers is named after this host ({hostname:?}): \
                     set it to this replica's address",
                    if named.is_empty() { "none" } else { "more than one" }
                ),
                ))
            }
        }
    }

    /// Replaces `secret_file` or `secret_env` by the secret it holds.
    pub(super) fn load_secret(&mut self) -> Result<(), ConfigError> {
        if let Some(file) = &self.secret_file {
            self.secret = Some(Secret::from_file("cluster.secret_file", file)?);
        }
        if let Some(variable) = &self.secret_env {
            self.secret = Some(Secret::from_env("cluster.secret_env", variable)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ClusterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn self_is_a_peer_and_a_long_enough_secret_is_required() {
        let peers = "peers = [\"http://10.0.0.11:5000\", \"http://10.0.0.12:5000/\"]\n";
        let ok = parsed(&format!(
            "self = \"http://10.0.0.12:5000\"\n{peers}secret = \"0123456789abcdef\""
        ));
        ok.validate().unwrap();
        for (bad, key) in [
            (
                format!("self = \"http://10.0.0.13:5000\"\n{peers}secret = \"0123456789abcdef\""),
                "cluster.self",
            ),
            (
                format!("self = \"http://10.0.0.11:5000\"\n{peers}"),
                "cluster.secret_file",
            ),
            (
                format!("self = \"http://10.0.0.11:5000\"\n{peers}secret = \"short\""),
                "cluster.secret",
            ),
            (
                "self = \"http://a:1\"\npeers = [\"http://a:1/v2\"]\nsecret = \"0123456789abcdef\""
                    .to_string(),
                "cluster.peers[0]",
            ),
            (
                "self = \"ftp://a:1\"\npeers = [\"ftp://a:1\"]\nsecret = \"0123456789abcdef\""
                    .to_string(),
                "cluster.peers[0]",
            ),
        ] {
            let e = parsed(&bad).validate().unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn without_self_the_peer_named_after_this_host_is_this_replica() {
        let c = parsed(
            "peers = [\"http://regmirror-0.peers:5000\", \"http://regmirror-1.peers:5000\", \
             \"http://regmirror-10.peers:5000\"]\nsecret = \"0123456789abcdef\"",
        );
        c.validate().unwrap();
        assert_eq!(
            c.own_address("regmirror-1").unwrap(),
            "http://regmirror-1.peers:5000"
        );
        // A host name given whole (an FQDN) is the same host.
        assert_eq!(
            c.own_address("regmirror-10.example.internal").unwrap(),
            "http://regmirror-10.peers:5000"
        );
        let e = c.own_address("elsewhere").unwrap_err().to_string();
        assert!(e.contains("cluster.self") && e.contains("none"), "{e}");
        let twice =
            parsed("peers = [\"http://a:1\", \"http://a:2\"]\nsecret = \"0123456789abcdef\"");
        assert!(twice.own_address("a").is_err());
    }

    #[test]
    fn the_secret_comes_from_a_file_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.secret");
        std::fs::write(&file, "a-cluster-secret-of-some-length\n").unwrap();
        let mut c = parsed(&format!(
            "self = \"http://a:1\"\npeers = [\"http://a:1\"]\nsecret_file = {file:?}"
        ));
        assert_eq!(c.own_address("whatever").unwrap(), "http://a:1");
        c.validate().unwrap();
        c.load_secret().unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.secret.as_ref().map(Secret::expose),
            Some("a-cluster-secret-of-some-length")
        );
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(!shown.contains("a-cluster-secret"), "{shown}");
    }
}
