//! How peers prove a request comes from the cluster: an HMAC-SHA256, under the cluster
//! secret, of the method, the path and query, and the time, sent in one header. The header is
//! also the hop marker: nothing a replica starts for a signed request asks another peer.
//!
//! A tag's owner signs its answer too ([`Signer::sign_answer`]): unlike a blob or a manifest by
//! digest, what a tag points to cannot be checked by its bytes, so an answer from whoever holds
//! a peer's address (a reused IP, a spoofed name) must not be taken for the owner's.
//!
//! The secret itself never travels. A signature is good for [`MAX_SKEW`] either side of its
//! time (clocks of a fleet agree to seconds), and only for the request it names.

use http::{HeaderValue, Method};
use ring::hmac;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The header a peer request carries: `<unix seconds>.<hex signature>`.
pub const PEER_HEADER: &str = "x-regmirror-peer";

/// The header naming the process a peer request comes from: a replica refuses its own.
pub const INSTANCE_HEADER: &str = "x-regmirror-instance";

/// The header of a peer's answer that refuses a cluster request (bad signature, another
/// secret, clocks apart, this very replica): unlike a refusal upstream passed on, it says the
/// peer is not to be asked.
pub const REFUSED_HEADER: &str = "x-regmirror-peer-refused";

/// The header of a tag owner's answer: `<age in ms>.<1 if stale, else 0>.<hex signature>`,
/// signed over the request's own signature, the status and the digest.
pub const ANSWER_HEADER: &str = "x-regmirror-tag-answer";

/// What a tag owner's signed answer says besides the digest.
#[derive(Debug, PartialEq, Eq)]
pub struct SignedAnswer {
    /// How long ago upstream confirmed the tag.
    pub age: Duration,
    /// Upstream could not be asked: the owner's last known mapping.
    pub stale: bool,
}

/// How far a signature's time may be from this replica's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// Signs and checks peer requests with the cluster secret.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    pub fn new(secret: &str) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    /// The header value for `method path_and_query` sent now.
    pub fn sign(&self, method: &Method, path_and_query: &str) -> HeaderValue {
        let time = now_secs();
        let tag = hmac::sign(&self.key, &message(method, path_and_query, time));
        let value = format!("{time}.{}", hex(tag.as_ref()));
        HeaderValue::from_str(&value).expect("digits, a dot and hex")
    }

    /// Whether `header` signs `method path_and_query` with this secret, within the skew.
    pub fn verify(
        &self,
        method: &Method,
        path_and_query: &str,
        header: &HeaderValue,
    ) -> Result<(), &'static str> {
        let text = header.to_str().map_err(|_| "not text")?;
        let (time, tag) = text.split_once('.').ok_or("not <time>.<signature>")?;
        let time: u64 = time.parse().map_err(|_| "not <time>.<signature>")?;
        if now_secs().abs_diff(time) > MAX_SKEW.as_secs() {
            return Err("signed too long ago (or clocks disagree)");
        }
        let tag = unhex(tag).ok_or("not <time>.<signature>")?;
        hmac::verify(&self.key, &message(method, path_and_query, time), &tag)
            .map_err(|_| "not signed with the cluster secret")
    }
}

impl Signer {
    /// The [`ANSWER_HEADER`] value for an answer to the request signed `request` (its
    /// [`PEER_HEADER`]) with `status`, naming `digest`.
    pub fn sign_answer(
        &self,
        request: &HeaderValue,
        status: u16,
        digest: &str,
        answer: &SignedAnswer,
    ) -> HeaderValue {
        let (age, stale) = (answer.age.as_millis() as u64, u8::from(answer.stale));
        let message = answer_message(request.as_bytes(), status, digest, age, stale);
        let tag = hmac::sign(&self.key, &message);
        let value = format!("{age}.{stale}.{}", hex(tag.as_ref()));
        HeaderValue::from_str(&value).expect("digits, dots and hex")
    }

    /// What `header` says of an answer with `status` naming `digest` to the request signed
    /// `request`, if this secret signed it.
    pub fn verify_answer(
        &self,
        request: &HeaderValue,
        status: u16,
        digest: &str,
        header: &HeaderValue,
    ) -> Result<SignedAnswer, &'static str> {
        let text = header.to_str().map_err(|_| "not text")?;
        let mut parts = text.splitn(3, '.');
        let malformed = "not <age>.<stale>.<signature>";
        let age: u64 = parts.next().and_then(|a| a.parse().ok()).ok_or(malformed)?;
        let stale: u8 = match parts.next() {
            Some("0") => 0,
            Some("1") => 1,
            _ => return Err(malformed),
        };
        let tag = parts.next().and_then(unhex).ok_or(malformed)?;
        let message = answer_message(request.as_bytes(), status, digest, age, stale);
        hmac::verify(&self.key, &message, &tag)
            .map_err(|_| "not signed with the cluster secret")?;
        Ok(SignedAnswer {
            age: Duration::from_millis(age),
            stale: stale == 1,
        })
    }
}

fn answer_message(request: &[u8], status: u16, digest: &str, age: u64, stale: u8) -> Vec<u8> {
    let mut message = b"answer\n".to_vec();
    message.extend_from_slice(request);
    message.extend_from_slice(format!("\n{status}\n{digest}\n{age}\n{stale}").as_bytes());
    message
}

fn message(method: &Method, path_and_query: &str, time: u64) -> Vec<u8> {
    format!("{method}\n{path_and_query}\n{time}").into_bytes()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_request_and_secret_only() {
        let signer = Signer::new("a-cluster-secret-of-some-length");
        let path = "/v2/library/app/blobs/sha256:00?ns=docker.io";
        let header = signer.sign(&Method::GET, path);
        signer.verify(&Method::GET, path, &header).unwrap();
        assert!(signer.verify(&Method::HEAD, path, &header).is_err());
        assert!(signer.verify(&Method::GET, "/v2/other", &header).is_err());
        let other = Signer::new("another-cluster-secret-entirely");
        assert!(other.verify(&Method::GET, path, &header).is_err());
        for bad in ["", "123", "x.y", "1.zz", &format!("1.{}", "00".repeat(32))] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert!(signer.verify(&Method::GET, path, &value).is_err(), "{bad}");
        }
        // An old signature is refused even when its tag is right.
        let old = now_secs() - MAX_SKEW.as_secs() - 10;
        let tag = hmac::sign(&signer.key, &message(&Method::GET, path, old));
        let value = HeaderValue::from_str(&format!("{old}.{}", hex(tag.as_ref()))).unwrap();
        assert!(signer.verify(&Method::GET, path, &value).is_err());
    }

    #[test]
    fn an_answer_signature_holds_for_its_request_status_digest_age_and_staleness_only() {
        let signer = Signer::new("a-cluster-secret-of-some-length");
        let request = signer.sign(&Method::GET, "/v2/library/app/manifests/latest");
        let answer = SignedAnswer {
            age: Duration::from_millis(1500),
            stale: false,
        };
        let digest = format!("sha256:{}", "ab".repeat(32));
        let header = signer.sign_answer(&request, 200, &digest, &answer);
        assert_eq!(
            signer.verify_answer(&request, 200, &digest, &header),
            Ok(answer)
        );
        let other_request = signer.sign(&Method::GET, "/v2/library/other/manifests/latest");
        assert!(signer
            .verify_answer(&other_request, 200, &digest, &header)
            .is_err());
        assert!(signer
            .verify_answer(&request, 304, &digest, &header)
            .is_err());
        let other_digest = format!("sha256:{}", "cd".repeat(32));
        assert!(signer
            .verify_answer(&request, 200, &other_digest, &header)
            .is_err());
        let other = Signer::new("another-cluster-secret-entirely");
        assert!(other
            .verify_answer(&request, 200, &digest, &header)
            .is_err());
        // Age or staleness changed on the way: refused.
        let text = header.to_str().unwrap();
        for forged in [
            text.replacen("1500.", "15.", 1),
            text.replacen(".0.", ".1.", 1),
        ] {
            let forged = HeaderValue::from_str(&forged).unwrap();
            assert!(signer
                .verify_answer(&request, 200, &digest, &forged)
                .is_err());
        }
    }
}
