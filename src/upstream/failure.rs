//! The failure model: what an upstream exchange that did not succeed came to, decided in one
//! place, and how the answers of a registry's endpoints combine into the one answer a client
//! gets.
//!
//! Every exchange (blob and manifest GET and HEAD, tag revalidation, `tags/list`, referrers,
//! tokens, probes) ends in success or in one [`Failure`]; callers act on the failure, never on
//! a raw status. Pure: no I/O.

use super::request::Resource;
use http::StatusCode;

/// What a failed exchange came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The endpoint could not be reached or did not answer well: a connection error, a
    /// timeout, a reset, a 5xx or 408, a stalled body, a token service that is down, a broken
    /// redirect. The endpoint backs off; the next one is tried.
    Outage,
    /// 429: the endpoint pauses manifest GETs as its headers say; the next one is tried.
    RateLimited,
    /// A deliberate refusal: 401 or 403 after authenticating, 405, any other 4xx. Not an
    /// outage; the next endpoint is tried.
    Refused,
    /// 404: final only when every eligible endpoint answered and none had an outage.
    NotFound,
    /// An answer that is not what was asked for (a digest or size mismatch, a manifest over
    /// 4 MiB, a HEAD without the headers it needs): never stored; the next endpoint is tried.
    BadContent,
}

impl Failure {
    /// The class of an answer with this status (`None`: a success).
    pub fn of_status(status: StatusCode) -> Option<Failure> {
        Some(match status.as_u16() {
            200..=299 => return None,
            404 => Failure::NotFound,
            429 => Failure::RateLimited,
            408 | 500..=599 => Failure::Outage,
            _ => Failure::Refused,
        })
    }

    /// The stable name used in logs and the README's table.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Outage => "outage",
            Failure::RateLimited => "rate limited",
            Failure::Refused => "refused",
            Failure::NotFound => "not found",
            Failure::BadContent => "bad content",
        }
    }

    /// Whether a tag's last known mapping answers for it: only when upstream could not be
    /// asked (down, or pausing us), never when it answered that the tag is gone or refused.
    pub fn serves_stale(self) -> bool {
        matches!(self, Failure::Outage | Failure::RateLimited)
    }
}

/// Why an upstream request failed: its class and what the client is told.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub failure: Failure,
    /// What was asked for (decides the error code of a 404).
    pub resource: Resource,
    /// Upstream's status, when it answered with one.
    pub status: Option<u16>,
    /// Seconds after which asking again may do better (429; an outage: the soonest end of an
    /// endpoint's pause).
    pub retry_after: Option<u64>,
    /// For a 404: an endpoint trusted with the request said so (an untrusted mirror's 404
    /// never removes what a trusted endpoint said).
    pub authoritative: bool,
    pub message: String,
}

impl UpstreamError {
    pub fn new(failure: Failure, message: impl Into<String>) -> UpstreamError {
        UpstreamError {
            failure,
            resource: Resource::Other,
            status: None,
            retry_after: None,
            authoritative: false,
            message: message.into(),
        }
    }

    pub fn outage(message: impl Into<String>) -> UpstreamError {
        UpstreamError::new(Failure::Outage, message)
    }

    pub fn bad_content(message: impl Into<String>) -> UpstreamError {
        UpstreamError::new(Failure::BadContent, message)
    }

    /// An answer with a status that is not a success (the one place statuses are classified).
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> UpstreamError {
        let failure = Failure::of_status(status).unwrap_or(Failure::Refused);
        UpstreamError {
            status: Some(status.as_u16()),
            ..UpstreamError::new(failure, message)
        }
    }

    pub fn with_retry_after(mut self, seconds: Option<u64>) -> UpstreamError {
        self.retry_after = seconds;
        self
    }

    pub fn is_not_found(&self) -> bool {
        self.failure == Failure::NotFound
    }

    /// A 401 or 403: the repository is gone or private now (or the credentials are wrong).
    pub fn is_denial(&self) -> bool {
        self.failure == Failure::Refused && matches!(self.status, Some(401 | 403))
    }
}

/// The failures of one request's endpoints so far, and the one answer they come to.
#[derive(Default)]
pub struct Verdict {
    /// The first failure of each class, in the order of precedence.
    outage: Option<UpstreamError>,
    rate_limited: Option<UpstreamError>,
    bad_content: Option<UpstreamError>,
    not_found: Option<UpstreamError>,
    refused: Option<UpstreamError>,
}

impl Verdict {
    /// Records one endpoint's failure.
    pub fn note(&mut self, error: UpstreamError) {
        let slot = match error.failure {
            Failure::Outage => &mut self.outage,
            Failure::RateLimited => &mut self.rate_limited,
            Failure::BadContent => &mut self.bad_content,
            Failure::NotFound => &mut self.not_found,
            Failure::Refused => &mut self.refused,
        };
        match slot {
            // A trusted endpoint's 404 outweighs an untrusted one's.
            Some(kept) if error.authoritative && !kept.authoritative => *slot = Some(error),
            Some(_) => {}
            None => *slot = Some(error),
        }
    }

    /// Whether an endpoint trusted with the request answered 404 (untrusted ones are then not
    /// asked: they cannot overrule it).
    pub fn has_trusted_not_found(&self) -> bool {
        self.not_found.as_ref().is_some_and(|e| e.authoritative)
    }

    /// The answer for the client: an outage wins (what upstream holds is unknown), then a rate
    /// limit, bad content, a 404 (every endpoint that was asked answered), a refusal.
    /// `outage_retry` is when an endpoint may be back, for an outage's `Retry-After`.
    pub fn settle(self, resource: Resource, outage_retry: Option<u64>) -> UpstreamError {
        let mut error = if let Some(outage) = self.outage {
            let retry = outage.retry_after.or(outage_retry).unwrap_or(1).max(1);
            outage.with_retry_after(Some(retry))
        } else if let Some(limited) = self.rate_limited {
            limited
        } else if let Some(bad) = self.bad_content {
            bad
        } else if let Some(missing) = self.not_found {
            missing
        } else if let Some(refused) = self.refused {
            refused
        } else {
            // No endpoint may be asked (none is trusted with what a repository holds, say).
            UpstreamError::new(
                Failure::Refused,
                "no upstream endpoint of this registry may answer this request",
            )
        };
        error.resource = resource;
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_one_class_each() {
        let cases = [
            (200, None),
            (206, None),
            (404, Some(Failure::NotFound)),
            (429, Some(Failure::RateLimited)),
            (401, Some(Failure::Refused)),
            (403, Some(Failure::Refused)),
            (405, Some(Failure::Refused)),
            (400, Some(Failure::Refused)),
            (408, Some(Failure::Outage)),
            (500, Some(Failure::Outage)),
            (502, Some(Failure::Outage)),
            (503, Some(Failure::Outage)),
        ];
        for (status, class) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(Failure::of_status(status), class, "{status}");
        }
    }

    #[test]
    fn a_404_is_final_only_without_an_outage() {
        let mut verdict = Verdict::default();
        verdict.note(UpstreamError::from_status(StatusCode::NOT_FOUND, "a: 404"));
        verdict.note(UpstreamError::outage("b: refused"));
        let error = verdict.settle(Resource::Blob, Some(3));
        assert_eq!(error.failure, Failure::Outage);
        assert_eq!(error.retry_after, Some(3));

        let mut verdict = Verdict::default();
        verdict.note(UpstreamError::from_status(
            StatusCode::UNAUTHORIZED,
            "a: 401",
        ));
        verdict.note(UpstreamError::from_status(StatusCode::NOT_FOUND, "b: 404"));
        assert_eq!(
            verdict.settle(Resource::Blob, None).failure,
            Failure::NotFound
        );
    }

    #[test]
    fn a_trusted_404_outweighs_an_untrusted_one() {
        let mut verdict = Verdict::default();
        verdict.note(UpstreamError::from_status(StatusCode::NOT_FOUND, "mirror"));
        let mut trusted = UpstreamError::from_status(StatusCode::NOT_FOUND, "origin");
        trusted.authoritative = true;
        verdict.note(trusted);
        let error = verdict.settle(Resource::Manifest, None);
        assert!(error.authoritative);
        assert_eq!(error.message, "origin");
    }
}
