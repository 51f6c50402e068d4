//! Logins for mirrors with `[auth]` on: the `Authorization` a client sends, and the access
//! rules most tests use.

use base64::Engine;
use regmirror::config::{AccessRule, AuthConfig};
use std::path::Path;

/// `Authorization: Basic` for `user` and `password`.
pub fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// Anonymous clients may pull `library/*`; alice (password `alice-password`, in an htpasswd
/// file written under `dir`) may pull `myorg/*`.
pub fn alice_and_anonymous(dir: &Path) -> AuthConfig {
    let hash = bcrypt::hash("alice-password", 4).unwrap();
    std::fs::write(dir.join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    AuthConfig {
        realm: "regmirror".into(),
        htpasswd: Some(dir.join("htpasswd")),
        tokens_file: None,
        anonymous: vec!["library/*".into()],
        rule: vec![AccessRule {
            users: vec!["alice".into()],
            allow: vec!["myorg/*".into()],
        }],
    }
}

/// The mirror logs in to its (only) upstream as `mirror` / `upstream-secret`.
pub fn with_upstream_credentials(c: &mut regmirror::config::Config) {
    let upstream = &mut c.registry[0].upstream[0];
    upstream.username = Some("mirror".into());
    upstream.password = Some(regmirror::config::Secret::new("upstream-secret".into()));
}
