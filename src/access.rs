//! Client authentication and access rules (`[auth]`): who a request comes from and whether they
//! may pull a repository. Off unless configured: a LAN appliance serves everyone.
//!
//! Credentials: htpasswd users (bcrypt) and static tokens from a file. Registry clients are
//! challenged the way Docker Hub challenges them (`Bearer realm=".../token"`): they fetch a
//! token from the mirror's own token service, with their login as Basic credentials or
//! anonymously, and send it on every request. That one flow serves `docker login`, `podman
//! login`, `skopeo --creds`, `ctr --user` and dockerd, which cannot be given credentials for a
//! mirror but fetches anonymous tokens. A static token may also be sent directly as
//! `Authorization: Bearer <token>`, or as the password of its user; Basic credentials are accepted
//! on any request too. Wrong credentials are refused even where anonymous clients may pull, so a
//! typo in a password never silently turns into anonymous access.
//!
//! bcrypt is deliberately slow, and clients send Basic on every request: a verified login is
//! remembered for a few minutes under the SHA-256 of the credentials (never the credentials
//! themselves), and verifications run on the blocking pool, a few at a time, so a password-guessing
//! client cannot starve the server. Tokens are compared as SHA-256 digests, which keeps the
//! comparison time independent of how much of a guess was right.

use crate::config::{AuthConfig, RegistryConfig};
use crate::oci::names_registry_host;
use base64::Engine;
use http::{header, HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// How long a verified Basic login is remembered.
const LOGIN_MEMORY: Duration = Duration::from_secs(300);
/// bcrypt verifications running at once (each takes a core for tens of milliseconds).
const CONCURRENT_VERIFICATIONS: usize = 2;
/// Shortest static token accepted in the tokens file.
const MIN_TOKEN_LEN: usize = 16;
/// Lifetime of a token issued by the token service.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Issued tokens remembered at once (each a few dozen bytes).
const MAX_ISSUED_TOKENS: u64 = 100_000;
/// Logins that may wait for a bcrypt slot; more are told to come back (429).
const MAX_WAITING_LOGINS: usize = 64;

/// Who sent a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(String),
}

impl Principal {
    /// The name for the access log (`-` when anonymous).
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "-",
            Principal::User(name) => name,
        }
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Pulling from `registry/repository`: by the access rules.
    Pull { registry: &'a str, repo: &'a str },
    /// The API base and catalog: valid credentials of any kind (an anonymous token too), so
    /// that a client without any is challenged and fetches a token.
    Credentials,
    /// The console: a signed-in user.
    SignedIn,
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denial {
    /// No (valid) credentials: 401 with a challenge, so the client logs in.
    Unauthenticated(String),
    /// Signed in but not allowed this repository: 403.
    Forbidden { user: String, why: String },
    /// Too many logins are being checked: 429, try again shortly.
    Busy,
}

/// Decrements a counter when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A `registry/repository` pattern: `*` matches any run of characters, `/` included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Parses a pattern; one without a registry host means the default registry. A named
    /// registry must be configured (a typo would otherwise silently match nothing).
    pub fn parse(text: &str, registries: &[RegistryConfig]) -> Result<Pattern, String> {
        let text = text.trim();
        if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{text:?} is not a pattern"));
        }
        if text == "*" {
            return Ok(Pattern(text.to_string()));
        }
        let first = text.split('/').next().unwrap_or(text);
        if first.contains('*') {
            return Ok(Pattern(text.to_string()));
        }
        if names_registry_host(first) {
            if !registries.iter().any(|r| r.name == first) {
                return Err(format!(
                    "{text:?} names registry {first:?}, which is not configured"
                ));
            }
            return Ok(Pattern(text.to_string()));
        }
        match registries.iter().find(|r| r.default) {
            Some(default) => Ok(Pattern(format!("{}/{text}", default.name))),
            None => Err(format!(
                "{text:?} names no registry and none is the default; write e.g. docker.io/{text}"
            )),
        }
    }

    pub fn matches(&self, registry: &str, repo: &str) -> bool {
        glob_match(self.0.as_bytes(), format!("{registry}/{repo}").as_bytes())
    }
}

/// Wildcard match where `*` matches any run of bytes (the classic greedy scan with backtracking
/// to the last star: linear in practice, never exponential).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

struct Rule {
    /// Empty: every signed-in user.
    users: Vec<String>,
    every_user: bool,
    allow: Vec<Pattern>,
}

/// The loaded `[auth]` section: users, tokens and rules.
pub struct Access {
    challenge: HeaderValue,
    /// User name to bcrypt hash.
    passwords: HashMap<String, String>,
    /// SHA-256 of a token to its user.
    tokens: HashMap<[u8; 32], String>,
    anonymous: Vec<Pattern>,
    rules: Vec<Rule>,
    /// What a login for a user who does not exist is checked against, so that a refusal takes
    /// as long for an unknown user as for a wrong password (empty when there are no passwords).
    decoy_hash: String,
    /// Logins, tokens and bcrypt slots, kept across reloads.
    state: Arc<Sessions>,
    /// The `service` named in challenges.
    service: String,
}

/// What outlives a reload of `[auth]`: verified logins, issued tokens, the bcrypt slots and the
/// anonymous token. Entries are rechecked against the current users when used.
pub struct Sessions {
    /// SHA-256 of verified `user\0password` pairs to the user and the hash they matched.
    verified: moka::sync::Cache<[u8; 32], (String, String)>,
    /// SHA-256 of tokens issued to signed-in users, to the user and the credential they
    /// logged in with (the token dies when that credential changes).
    issued: moka::sync::Cache<[u8; 32], (String, Credential)>,
    verifications: Arc<Semaphore>,
    /// Logins waiting for a bcrypt slot.
    waiting: AtomicUsize,
    /// One token for every anonymous client, random per process: stateless, so fetching
    /// anonymous tokens costs no memory.
    anonymous_token: String,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions {
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(LOGIN_MEMORY)
                .build(),
            issued: moka::sync::Cache::builder()
                .max_capacity(MAX_ISSUED_TOKENS)
                .time_to_live(TOKEN_LIFETIME)
                .build(),
            verifications: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
            waiting: AtomicUsize::new(0),
            anonymous_token: new_token().unwrap_or_default(),
        }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

impl Access {
    /// Reads the htpasswd and tokens files named by `config`; `state` carries logins and tokens
    /// over from the generation before a reload.
    pub fn load(
        config: &AuthConfig,
        registries: &[RegistryConfig],
        state: Arc<Sessions>,
    ) -> Result<Access, String> {
        let passwords = match &config.htpasswd {
            Some(path) => parse_htpasswd(&read(path, "auth.htpasswd")?)
                .map_err(|e| format!("auth.htpasswd {}: {e}", path.display()))?,
            None => HashMap::new(),
        };
        let tokens = match &config.tokens_file {
            Some(path) => parse_tokens(&read(path, "auth.tokens_file")?)
                .map_err(|e| format!("auth.tokens_file {}: {e}", path.display()))?,
            None => HashMap::new(),
        };
        let patterns = |list: &[String]| -> Result<Vec<Pattern>, String> {
            list.iter().map(|p| Pattern::parse(p, registries)).collect()
        };
        let rules = config
            .rule
            .iter()
            .map(|rule| {
                Ok(Rule {
                    every_user: rule.users.iter().any(|u| u == "*"),
                    users: rule.users.clone(),
                    allow: patterns(&rule.allow)?,
                })
            })
            .collect::<Result<_, String>>()?;
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{}\"", config.realm))
            .map_err(|e| format!("auth.realm: {e}"))?;
        // As costly as the dearest real hash (bcrypt's cost is the two digits after `$2y$`);
        // without passwords there is nothing to guess at and no decoy.
        let cost = passwords
            .values()
            .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
            .max();
        let decoy_hash = match cost {
            Some(cost) => bcrypt::hash("regmirror decoy password", cost.clamp(4, 31))
                .map_err(|e| format!("auth.htpasswd: {e}"))?,
            None => String::new(),
        };
        Ok(Access {
            challenge,
            passwords,
            tokens,
            anonymous: patterns(&config.anonymous)?,
            rules,
            decoy_hash,
            state,
            service: config.realm.clone(),
        })
    }

    /// The Basic challenge (the console in a browser, the token service itself).
    pub fn basic_challenge(&self) -> HeaderValue {
        self.challenge.clone()
    }

    /// The registry challenge: fetch a token from `base/token`, for `repo` when given.
    pub fn bearer_challenge(&self, base: &str, repo: Option<&str>) -> HeaderValue {
        let mut value = format!("Bearer realm=\"{base}/token\",service=\"{}\"", self.service);
        if let Some(repo) = repo {
            value.push_str(&format!(",scope=\"repository:{repo}:pull\""));
        }
        HeaderValue::from_str(&value).unwrap_or_else(|_| self.challenge.clone())
    }

    /// The token service: a new token for whoever these headers identify (anonymous clients
    /// get an anonymous token; wrong credentials get nothing).
    pub async fn issue_token(&self, headers: &HeaderMap) -> Result<String, Denial> {
        // A token is exchanged for a login, never for another token: one cannot be renewed
        // for ever.
        let (user, credential) = match self.identify_with(headers, false).await? {
            (Principal::User(user), Some(credential)) => (user, credential),
            _ => return Ok(self.state.anonymous_token.clone()),
        };
        let token =
            new_token().map_err(|_| Denial::Unauthenticated("no randomness for a token".into()))?;
        self.state
            .issued
            .insert(sha256(token.as_bytes()), (user, credential));
        Ok(token)
    }

    /// Who sent these headers; wrong or malformed credentials are an error, none is anonymous.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Principal, Denial> {
        Ok(self.identify_with(headers, true).await?.0)
    }

    /// Who sent these headers, and with which credential (none for the anonymous and for
    /// issued tokens).
    async fn identify_with(
        &self,
        headers: &HeaderMap,
        issued: bool,
    ) -> Result<(Principal, Option<Credential>), Denial> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok((Principal::Anonymous, None));
        };
        let value = value
            .to_str()
            .map_err(|_| Denial::Unauthenticated("malformed Authorization header".into()))?;
        match parse_authorization(value)? {
            Credentials::Bearer(token) => {
                let key = sha256(token.as_bytes());
                if let Some(user) = self.tokens.get(&key) {
                    return Ok((Principal::User(user.clone()), Some(Credential::Token(key))));
                }
                let unknown = || Denial::Unauthenticated("unknown or expired token".into());
                if !issued {
                    return Err(unknown());
                }
                if key == sha256(self.state.anonymous_token.as_bytes()) {
                    return Ok((Principal::Anonymous, None));
                }
                match self.state.issued.get(&key) {
                    // Void once the login it was issued for is gone or changed.
                    Some((user, credential)) if self.still_valid(&user, &credential) => {
                        Ok((Principal::User(user), None))
                    }
                    _ => Err(unknown()),
                }
            }
            Credentials::Basic { user, password } => {
                let (who, credential) = self.login(&user, &password).await?;
                Ok((who, Some(credential)))
            }
        }
    }

    /// Whether `credential` still signs `user` in (the hash or the token is unchanged).
    fn still_valid(&self, user: &str, credential: &Credential) -> bool {
        match credential {
            Credential::Password(hash) => self.passwords.get(user) == Some(hash),
            Credential::Token(key) => self.tokens.get(key).map(String::as_str) == Some(user),
        }
    }

    async fn login(&self, user: &str, password: &str) -> Result<(Principal, Credential), Denial> {
        // The message names no user: one who typed the password as the name would log it.
        let refused = || Denial::Unauthenticated("wrong user name or password".into());
        let token = sha256(password.as_bytes());
        if let Some(token_user) = self.tokens.get(&token) {
            return if token_user == user {
                Ok((Principal::User(user.to_string()), Credential::Token(token)))
            } else {
                Err(refused())
            };
        }
        let (hash, known_user) = match self.passwords.get(user) {
            Some(hash) => (hash, true),
            None if self.decoy_hash.is_empty() => return Err(refused()),
            None => (&self.decoy_hash, false),
        };
        let key = sha256(format!("{user}\0{password}").as_bytes());
        // Remembered only while the user's hash is the one it matched (a reload may change it).
        if let Some((_, matched)) = self.state.verified.get(&key) {
            if known_user && &matched == hash {
                return Ok((
                    Principal::User(user.to_string()),
                    Credential::Password(hash.clone()),
                ));
            }
        }
        let matched = self.verify_bcrypt(password, hash).await?;
        if !(matched && known_user) {
            return Err(refused());
        }
        self.state
            .verified
            .insert(key, (user.to_string(), hash.clone()));
        Ok((
            Principal::User(user.to_string()),
            Credential::Password(hash.clone()),
        ))
    }

    /// Runs bcrypt on the blocking pool, a few at a time; refuses at once when too many logins
    /// already wait (a password guesser must not keep real users waiting for minutes).
    async fn verify_bcrypt(&self, password: &str, hash: &str) -> Result<bool, Denial> {
        let waiting = self.state.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Decrement(&self.state.waiting);
        if waiting >= MAX_WAITING_LOGINS {
            return Err(Denial::Busy);
        }
        let permit = Arc::clone(&self.state.verifications)
            .acquire_owned()
            .await
            .map_err(|_| Denial::Busy)?;
        let (hash, attempt) = (hash.to_string(), password.to_string());
        Ok(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(attempt, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false))
    }

    /// Whether `who` may pull `registry/repo`.
    pub fn may_pull(&self, who: &Principal, registry: &str, repo: &str) -> bool {
        let matching = |patterns: &[Pattern]| patterns.iter().any(|p| p.matches(registry, repo));
        match who {
            Principal::Anonymous => matching(&self.anonymous),
            Principal::User(name) => {
                self.rules.is_empty()
                    || matching(&self.anonymous)
                    || self
                        .rules
                        .iter()
                        .filter(|r| r.every_user || r.users.iter().any(|u| u == name))
                        .any(|r| matching(&r.allow))
            }
        }
    }

    /// Checks a request's credentials against what it needs; returns who sent it.
    pub async fn authorize(
        &self,
        headers: &HeaderMap,
        need: Need<'_>,
    ) -> Result<Principal, Denial> {
        let presented = headers.contains_key(header::AUTHORIZATION);
        let who = self.identify(headers).await?;
        let required = || Denial::Unauthenticated("authentication required".into());
        match (need, &who) {
            (Need::Credentials, _) if presented => Ok(who),
            (Need::Credentials, _) => Err(required()),
            (Need::SignedIn, Principal::User(_)) => Ok(who),
            (Need::SignedIn, Principal::Anonymous) => Err(required()),
            (Need::Pull { registry, repo }, _) if self.may_pull(&who, registry, repo) => Ok(who),
            (Need::Pull { .. }, Principal::Anonymous) => Err(required()),
            (Need::Pull { registry, repo }, Principal::User(name)) => Err(Denial::Forbidden {
                user: name.clone(),
                why: format!("{name:?} may not pull {registry}/{repo}"),
            }),
        }
    }
}

/// 32 random bytes as hex.
fn new_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What a user signed in with: their bcrypt hash at the time, or a static token's digest.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Credential {
    Password(String),
    Token([u8; 32]),
}

/// What an `Authorization` header carries.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    Bearer(String),
    Basic { user: String, password: String },
}

fn parse_authorization(value: &str) -> Result<Credentials, Denial> {
    let malformed = |what: &str| Denial::Unauthenticated(format!("malformed {what}"));
    let value = value.trim();
    let (scheme, credentials) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if credentials.is_empty() {
            return Err(malformed("Bearer token"));
        }
        return Ok(Credentials::Bearer(credentials.to_string()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        // Not echoed: a raw token sent without a scheme would land in the log.
        return Err(Denial::Unauthenticated(
            "unsupported authorization scheme (Basic or Bearer)".into(),
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| malformed("Basic credentials"))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| malformed("Basic credentials"))?;
    Ok(Credentials::Basic {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// Entry points for the fuzz targets (`fuzz/`): every parser here that sees outside input.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Feeds `data` to the `Authorization` parser, the htpasswd and tokens parsers and the
    /// pattern matcher, checking what they promise.
    pub fn check(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(Credentials::Basic { user, .. }) = parse_authorization(text) {
            assert!(!user.contains(':'));
        }
        if let Ok(users) = parse_htpasswd(text) {
            assert!(users.values().all(|h| h.starts_with("$2")));
        }
        let _ = parse_tokens(text);
        let (pattern, name) = text.split_once('\n').unwrap_or((text, text));
        let matched = glob_match(pattern.as_bytes(), name.as_bytes());
        if !pattern.contains('*') {
            assert_eq!(matched, pattern == name);
        }
        assert!(glob_match(b"*", name.as_bytes()));
    }
}

fn read(path: &Path, key: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `user:hash` lines; only bcrypt hashes (`htpasswd -B`), the others are weak or unsalted.
fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("line {number}: expected user:hash"))?;
        if user.is_empty() {
            return Err(format!("line {number}: empty user name"));
        }
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            return Err(format!(
                "line {number} ({user}): only bcrypt entries are accepted (create them with htpasswd -B)"
            ));
        }
        if users.insert(user.to_string(), hash.to_string()).is_some() {
            return Err(format!("line {number}: user {user:?} appears twice"));
        }
    }
    Ok(users)
}

/// `user token` lines.
fn parse_tokens(text: &str) -> Result<HashMap<[u8; 32], String>, String> {
    let mut tokens = HashMap::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(user), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("line {number}: expected `<user> <token>`"));
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "line {number} ({user}): tokens must be at least {MIN_TOKEN_LEN} characters"
            ));
        }
        if tokens
            .insert(sha256(token.as_bytes()), user.to_string())
            .is_some()
        {
            return Err(format!("line {number}: a token appears twice"));
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccessRule, UpstreamConfig};

    fn registries() -> Vec<RegistryConfig> {
        vec![
            RegistryConfig::new("docker.io", true, vec![UpstreamConfig::new("https://a")]),
            RegistryConfig::new("ghcr.io", false, vec![UpstreamConfig::new("https://b")]),
        ]
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        assert!(glob_match(
            b"docker.io/library/*",
            b"docker.io/library/alpine"
        ));
        assert!(glob_match(b"docker.io/library/*", b"docker.io/library/a/b"));
        assert!(!glob_match(
            b"docker.io/library/*",
            b"docker.io/libraryx/alpine"
        ));
        assert!(glob_match(b"*/myorg/*", b"ghcr.io/myorg/tool"));
        assert!(glob_match(b"*", b"anything/at/all"));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYY"));
        assert!(glob_match(b"exact/name", b"exact/name"));
        assert!(!glob_match(b"exact/name", b"exact/name2"));
    }

    #[test]
    fn patterns_default_to_the_default_registry_and_refuse_unknown_ones() {
        let r = registries();
        let p = Pattern::parse("library/*", &r).unwrap();
        assert!(p.matches("docker.io", "library/alpine"));
        assert!(!p.matches("ghcr.io", "library/alpine"));
        assert!(Pattern::parse("ghcr.io/myorg/*", &r)
            .unwrap()
            .matches("ghcr.io", "myorg/x"));
        assert!(Pattern::parse("quay.io/x/*", &r).is_err());
        assert!(Pattern::parse("", &r).is_err());
        assert!(Pattern::parse("a b", &r).is_err());
    }

    #[test]
    fn htpasswd_accepts_only_bcrypt() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = parse_htpasswd(&format!("# c\n\nalice:{hash}\n")).unwrap();
        assert_eq!(users.len(), 1);
        assert!(parse_htpasswd("bob:$apr1$xyz$abc")
            .unwrap_err()
            .contains("bcrypt"));
        assert!(parse_htpasswd("bob").is_err());
        assert!(parse_htpasswd(&format!("a:{hash}\na:{hash}")).is_err());
    }

    #[test]
    fn tokens_need_a_user_and_length() {
        assert_eq!(parse_tokens("ci 0123456789abcdef\n").unwrap().len(), 1);
        assert!(parse_tokens("ci short").is_err());
        assert!(parse_tokens("ci").is_err());
        assert!(parse_tokens("ci a b").is_err());
    }

    fn access(dir: &Path) -> Access {
        let hash = bcrypt::hash("secret-pw", 4).unwrap();
        std::fs::write(dir.join("htpasswd"), format!("alice:{hash}\nbob:{hash}\n")).unwrap();
        std::fs::write(dir.join("tokens"), "ci ci-token-0123456789\n").unwrap();
        let config = AuthConfig {
            realm: "regmirror".into(),
            htpasswd: Some(dir.join("htpasswd")),
            tokens_file: Some(dir.join("tokens")),
            anonymous: vec!["library/*".into()],
            rule: vec![
                AccessRule {
                    users: vec!["alice".into()],
                    allow: vec!["ghcr.io/myorg/*".into()],
                },
                AccessRule {
                    users: vec!["ci".into()],
                    allow: vec!["*".into()],
                },
            ],
        };
        Access::load(&config, &registries(), Arc::default()).unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {encoded}").parse().unwrap(),
        );
        headers
    }

    #[tokio::test]
    async fn users_tokens_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let access = access(dir.path());
        let alice = Principal::User("alice".into());
        assert_eq!(
            access.identify(&basic("alice", "secret-pw")).await,
            Ok(alice.clone())
        );
        // Remembered: the second login does not run bcrypt again (same answer either way).
        assert_eq!(
            access.identify(&basic("alice", "secret-pw")).await,
            Ok(alice.clone())
        );
        assert!(access.identify(&basic("alice", "wrong")).await.is_err());
        assert!(access
            .identify(&basic("nobody", "secret-pw"))
            .await
            .is_err());
        let ci = Principal::User("ci".into());
        assert_eq!(
            access.identify(&basic("ci", "ci-token-0123456789")).await,
            Ok(ci.clone())
        );
        assert!(access
            .identify(&basic("alice", "ci-token-0123456789"))
            .await
            .is_err());
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            "Bearer ci-token-0123456789".parse().unwrap(),
        );
        assert_eq!(access.identify(&bearer).await, Ok(ci.clone()));
        bearer.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(access.identify(&bearer).await.is_err());
        assert_eq!(
            access.identify(&HeaderMap::new()).await,
            Ok(Principal::Anonymous)
        );

        assert!(access.may_pull(&Principal::Anonymous, "docker.io", "library/alpine"));
        assert!(!access.may_pull(&Principal::Anonymous, "docker.io", "someone/else"));
        assert!(access.may_pull(&alice, "ghcr.io", "myorg/tool"));
        assert!(access.may_pull(&alice, "docker.io", "library/alpine"));
        assert!(!access.may_pull(&alice, "ghcr.io", "other/tool"));
        let bob = Principal::User("bob".into());
        assert!(!access.may_pull(&bob, "ghcr.io", "myorg/tool"));
        assert!(access.may_pull(&ci, "ghcr.io", "other/tool"));

        let tool = Need::Pull {
            registry: "ghcr.io",
            repo: "myorg/tool",
        };
        let denied = access.authorize(&basic("bob", "secret-pw"), tool).await;
        assert!(matches!(denied, Err(Denial::Forbidden { .. })));
        let anonymous = access.authorize(&HeaderMap::new(), tool).await;
        assert!(matches!(anonymous, Err(Denial::Unauthenticated(_))));
        let base = access.authorize(&HeaderMap::new(), Need::Credentials).await;
        assert!(matches!(base, Err(Denial::Unauthenticated(_))));

        // Issued tokens stand for whoever asked for them.
        let token = access
            .issue_token(&basic("alice", "secret-pw"))
            .await
            .unwrap();
        let mut with_token = HeaderMap::new();
        let bearer = |t: &str| HeaderValue::from_str(&format!("Bearer {t}")).unwrap();
        with_token.insert(header::AUTHORIZATION, bearer(&token));
        assert_eq!(access.identify(&with_token).await, Ok(alice.clone()));
        assert!(access.authorize(&with_token, tool).await.is_ok());
        let anonymous_token = access.issue_token(&HeaderMap::new()).await.unwrap();
        with_token.insert(header::AUTHORIZATION, bearer(&anonymous_token));
        assert_eq!(access.identify(&with_token).await, Ok(Principal::Anonymous));
        assert!(access
            .authorize(&with_token, Need::Credentials)
            .await
            .is_ok());
        assert!(access.authorize(&with_token, Need::SignedIn).await.is_err());
        assert!(access.authorize(&with_token, tool).await.is_err());
        assert!(access.issue_token(&basic("alice", "wrong")).await.is_err());

        // A reload keeps issued tokens, but one whose login changed is void.
        let token = access
            .issue_token(&basic("alice", "secret-pw"))
            .await
            .unwrap();
        let bob_token = access
            .issue_token(&basic("bob", "secret-pw"))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let reloaded = {
            let config = AuthConfig {
                realm: "regmirror".into(),
                htpasswd: Some(dir.path().join("htpasswd")),
                tokens_file: None,
                anonymous: vec![],
                rule: vec![],
            };
            let old_bob = access.passwords.get("bob").unwrap().clone();
            let new_alice = bcrypt::hash("changed", 4).unwrap();
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("alice:{new_alice}\nbob:{old_bob}\n"),
            )
            .unwrap();
            Access::load(&config, &registries(), Arc::clone(&access.state)).unwrap()
        };
        with_token.insert(header::AUTHORIZATION, bearer(&token));
        assert!(
            reloaded.identify(&with_token).await.is_err(),
            "password changed"
        );
        with_token.insert(header::AUTHORIZATION, bearer(&bob_token));
        assert_eq!(
            reloaded.identify(&with_token).await,
            Ok(Principal::User("bob".into())),
            "unchanged login keeps its token"
        );
    }
}
