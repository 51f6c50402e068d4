//! Errors at the HTTP boundary, grouped by who caused them, and the one table that turns each
//! into a status code and an OCI error body.
//!
//! `into_response` has no side effects; the access log line is written where the response
//! leaves (`proxy::handle`).

use crate::body::{self, ResponseBody};
use crate::digest::Mismatch;
use crate::route::RouteError;
use crate::upstream::{Failure, Resource, UpstreamError};
use http::{header, Response, StatusCode};

/// OCI / distribution error codes used by this mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    NameInvalid,
    DigestInvalid,
    ManifestInvalid,
    Unsupported,
    Unauthorized,
    Denied,
    /// A request URI longer than any valid one (the name part is what grows).
    UriTooLong,
    TooManyRequests,
    Unavailable,
    /// Upstream answered with something that is not what was asked for.
    BadGateway,
    Unknown,
}

impl Code {
    /// The code's wire name and its status: the one table.
    pub fn describe(self) -> (&'static str, StatusCode) {
        match self {
            Code::BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            Code::ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            Code::NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            Code::NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            Code::DigestInvalid => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            Code::ManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_GATEWAY),
            Code::Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            Code::Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Code::Denied => ("DENIED", StatusCode::FORBIDDEN),
            Code::UriTooLong => ("NAME_INVALID", StatusCode::URI_TOO_LONG),
            Code::TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            Code::Unavailable => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            Code::BadGateway => ("UNKNOWN", StatusCode::BAD_GATEWAY),
            Code::Unknown => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl Code {
    /// What a client is told for an upstream failure: the failure model's table.
    pub fn for_upstream(error: &UpstreamError) -> Code {
        match (error.failure, error.resource) {
            (Failure::Outage, _) => Code::Unavailable,
            (Failure::RateLimited, _) => Code::TooManyRequests,
            (Failure::Refused, _) => Code::Denied,
            (Failure::NotFound, Resource::Manifest | Resource::Referrers) => Code::ManifestUnknown,
            (Failure::NotFound, Resource::Blob) => Code::BlobUnknown,
            (Failure::NotFound, Resource::TagsList | Resource::Other) => Code::NameUnknown,
            (Failure::BadContent, Resource::Manifest) => Code::ManifestInvalid,
            (Failure::BadContent, _) => Code::BadGateway,
        }
    }
}

/// What a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client asked for something malformed or unsupported.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A failure already classified (not found upstream, a failed download).
    #[error("{message}")]
    Coded {
        code: Code,
        message: String,
        /// Seconds after which asking again may do better.
        retry_after: Option<u64>,
    },
    /// The upstream could not be reached or refused us.
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The upstream answered with content that is not what was asked for.
    #[error("upstream sent bad content: {0}")]
    BadContent(String),
    /// The cache's disk failed.
    #[error("cache storage: {0}")]
    Storage(#[from] std::io::Error),
    /// The outcome of a load shared by several waiting requests.
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
}

impl From<Mismatch> for Error {
    fn from(m: Mismatch) -> Self {
        Error::BadContent(m.to_string())
    }
}

impl Error {
    pub fn coded(code: Code, message: impl Into<String>) -> Error {
        Error::Coded {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A classified failure after which asking again in `retry_after` seconds may do better.
    pub fn coded_retry(code: Code, message: impl Into<String>, retry_after: Option<u64>) -> Error {
        Error::Coded {
            code,
            message: message.into(),
            retry_after,
        }
    }

    /// The OCI code (and through it the status) this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::Route(e) => match e {
                RouteError::NameInvalid(_) => Code::NameInvalid,
                RouteError::ReferenceInvalid(_) => Code::ManifestUnknown,
                RouteError::DigestInvalid(..) => Code::DigestInvalid,
                RouteError::Unsupported(_) => Code::Unsupported,
                RouteError::UnknownRegistry(_) => Code::NameUnknown,
                RouteError::NotFound(_) => Code::NameUnknown,
                RouteError::TooLong(_) => Code::UriTooLong,
            },
            Error::Coded { code, .. } => *code,
            Error::Shared(inner) => inner.code(),
            Error::Upstream(e) => Code::for_upstream(e),
            Error::BadContent(_) => Code::ManifestInvalid,
            Error::Storage(_) => Code::Unknown,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().describe().1
    }

    /// The class of the upstream failure behind this error, if one is.
    pub fn upstream(&self) -> Option<&UpstreamError> {
        match self {
            Error::Upstream(e) => Some(e),
            Error::Shared(inner) => inner.upstream(),
            _ => None,
        }
    }

    /// Whether a tag's last known mapping may answer instead (upstream unreachable or
    /// pausing us).
    pub fn serves_stale(&self) -> bool {
        self.upstream().is_some_and(|e| e.failure.serves_stale())
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Upstream(e) => e.retry_after,
            Error::Coded { retry_after, .. } => *retry_after,
            Error::Shared(inner) => inner.retry_after(),
            _ => None,
        }
    }

    /// The response: OCI error JSON (no body for HEAD).
    pub fn into_response(self, head: bool) -> Response<ResponseBody> {
        let (code, status) = self.code().describe();
        let message = self.to_string();
        let json = serde_json::json!({
            "errors": [{ "code": code, "message": message, "detail": null }]
        })
        .to_string();
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, json.len());
        if let Some(secs) = self.retry_after() {
            builder = builder.header(header::RETRY_AFTER, secs);
        }
        let body = if head {
            body::empty()
        } else {
            body::full(json)
        };
        builder.body(body).expect("static headers are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_errors_map_to_client_statuses() {
        let cases = [
            (RouteError::NameInvalid("A".into()), 400, "NAME_INVALID"),
            (
                RouteError::ReferenceInvalid("-".into()),
                404,
                "MANIFEST_UNKNOWN",
            ),
            (
                RouteError::DigestInvalid("x".into(), "bad".into()),
                400,
                "DIGEST_INVALID",
            ),
            (
                RouteError::Unsupported(http::Method::PUT),
                405,
                "UNSUPPORTED",
            ),
            (RouteError::NotFound("/x".into()), 404, "NAME_UNKNOWN"),
        ];
        for (err, status, code) in cases {
            let e = Error::from(err);
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code().describe().0, code);
        }
    }

    #[test]
    fn upstream_trouble_is_unavailable() {
        let e = Error::from(UpstreamError::outage("refused"));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let limited = UpstreamError::from_status(StatusCode::TOO_MANY_REQUESTS, "429")
            .with_retry_after(Some(7));
        let shared = Error::Shared(std::sync::Arc::new(Error::from(limited)));
        let response = shared.into_response(false);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
