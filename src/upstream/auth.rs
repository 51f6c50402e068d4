//! Upstream authentication: `WWW-Authenticate` parsing, the Docker token flow, and the token cache.
//!
//! A token is cached per (realm, service, scope) until it expires (60 s when the token endpoint
//! does not say), and concurrent requests needing the same token share one fetch. Once an
//! endpoint has challenged us, later requests send credentials up front instead of collecting a
//! 401 first. Credentials go only to the endpoint's own host and to the realm it names.

use crate::config::Secret;
use base64::Engine as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lifetime of a token whose endpoint did not say (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this long before they expire, so none is used as it runs out.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// The longest a token is kept, whatever its `expires_in` says.
const LONGEST_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses a `WWW-Authenticate` value; unknown schemes give `None`.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    let params = parse_params(params);
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    };
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(Challenge::Bearer {
            realm: get("realm").filter(|realm| !realm.is_empty())?,
            service: get("service"),
            scope: get("scope"),
        }),
        "basic" => Some(Challenge::Basic),
        _ => None,
    }
}

/// `key=value` and `key="quoted, value"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut consumed = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        consumed = i + 1;
                        break;
                    }
                    _ => v.push(c),
                }
            }
            value = v;
            rest = &quoted[consumed.min(quoted.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if !key.is_empty() {
            out.push((key, value));
        }
    }
    out
}

/// The answer of a token endpoint.
#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A bearer token and how long it may be used.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub lifetime: Duration,
}

/// Parses a token endpoint's JSON.
pub fn parse_token(body: &[u8]) -> Result<Token, String> {
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let value = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or("token response has no token")?;
    let lifetime = parsed
        .expires_in
        .filter(|&s| s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
        .min(LONGEST_TOKEN_LIFETIME);
    Ok(Token {
        value,
        lifetime: lifetime
            .saturating_sub(EXPIRY_MARGIN)
            .max(Duration::from_secs(1)),
    })
}

/// The key a token is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    pub scope: String,
}

impl TokenKey {
    /// The token endpoint URL for this key.
    pub fn url(&self) -> String {
        let mut url = self.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(service) = &self.service {
            url.push_str(&format!("{sep}service={}", encode(service)));
            sep = '&';
        }
        url.push_str(&format!("{sep}scope={}", encode(&self.scope)));
        url
    }
}

/// Percent-encodes a query value (keeping the characters scopes are made of readable).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct TokenExpiry;

impl moka::Expiry<TokenKey, Token> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        token: &Token,
        _created: Instant,
    ) -> Option<Duration> {
        Some(token.lifetime)
    }
}

/// An endpoint's account, if configured.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// The `Authorization: Basic ...` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// What an endpoint taught us about authenticating with it, and its tokens.
pub struct AuthState {
    pub credentials: Option<Credentials>,
    /// The last challenge seen, so later requests can authenticate up front.
    challenge: Mutex<Option<Challenge>>,
    tokens: moka::future::Cache<TokenKey, Token>,
}

impl AuthState {
    pub fn new(credentials: Option<Credentials>) -> AuthState {
        AuthState {
            credentials,
            challenge: Mutex::new(None),
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(TokenExpiry)
                .build(),
        }
    }

    pub fn remember(&self, challenge: Challenge) {
        *self.challenge.lock().expect("auth lock poisoned") = Some(challenge);
    }

    pub fn known_challenge(&self) -> Option<Challenge> {
        self.challenge.lock().expect("auth lock poisoned").clone()
    }

    /// The key of the token a request in `scope` needs under `challenge`.
    pub fn token_key(challenge: &Challenge, scope: &str) -> Option<TokenKey> {
        match challenge {
            Challenge::Bearer { realm, service, .. } => Some(TokenKey {
                realm: realm.clone(),
                service: service.clone(),
                scope: scope.to_string(),
            }),
            Challenge::Basic => None,
        }
    }

    /// A cached token, or the one `fetch` returns (one fetch for all concurrent askers).
    pub async fn token<F, E>(&self, key: TokenKey, fetch: F) -> Result<Token, E>
    where
        F: std::future::Future<Output = Result<Token, E>>,
        E: Clone + Send + Sync + 'static,
    {
        self.tokens
            .try_get_with(key, fetch)
            .await
            .map_err(|e| e.as_ref().clone())
    }

    /// Forgets a token the endpoint refused.
    pub async fn forget(&self, key: &TokenKey) {
        self.tokens.invalidate(key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn parses_quoted_commas_unquoted_values_and_basic() {
        let c = parse_challenge(
            r#"bearer realm=http://h/t, scope="repository:a:pull,push",service="s""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: Some("s".into()),
                scope: Some("repository:a:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_some());
    }

    #[test]
    fn token_lifetime_defaults_to_sixty_seconds() {
        let t = parse_token(br#"{"token":"abc"}"#).unwrap();
        assert_eq!(t.value, "abc");
        assert_eq!(t.lifetime, Duration::from_secs(55));
        let t = parse_token(br#"{"access_token":"x","expires_in":300}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(295));
        let t = parse_token(br#"{"token":"x","expires_in":18446744073709551615}"#).unwrap();
        assert_eq!(t.lifetime, LONGEST_TOKEN_LIFETIME - EXPIRY_MARGIN);
        assert!(parse_token(br#"{"token":""}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
    }

    #[test]
    fn token_url_encodes_query() {
        let k = TokenKey {
            realm: "https://auth.example/token".into(),
            service: Some("registry example".into()),
            scope: "repository:library/alpine:pull".into(),
        };
        assert_eq!(
            k.url(),
            "https://auth.example/token?service=registry%20example&scope=repository:library/alpine:pull"
        );
    }

    #[test]
    fn basic_header() {
        let c = Credentials {
            username: "u".into(),
            password: Secret::new("p".into()),
        };
        assert_eq!(c.basic(), "Basic dTpw");
    }
}
