//! How peers prove a request comes from the cluster: an HMAC-SHA256, under the cluster
//! secret, of the method, the path and query, and the time, sent in one header. The header is
//! also the hop marker: a replica never passes a signed request on to another peer.
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
}
