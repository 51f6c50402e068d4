//! How the bucket client talks HTTP: `object_store`'s S3 client over the same hyper and rustls
//! (ring) stack as the upstreams, with its own connection pool and time limits. (The crate's
//! own connector is reqwest with another TLS library: a second HTTP stack for one job.)

use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest,
    HttpRequestBody, HttpResponse, HttpResponseBody, HttpService,
};
use std::time::Duration;

/// Idle connections kept to the bucket (uploads and reads of several blobs at once).
const IDLE_CONNECTIONS: usize = 16;
/// A POST (starting or completing a multipart upload) may take this many times the time limit.
const COMPLETE_TIMES: u32 = 12;
/// A request that sends a body (an upload's part) gets one more second per this many bytes.
const UPLOAD_BYTES_PER_SECOND: u64 = 256 * 1024;

/// Builds the bucket's HTTP client.
/// Plain http is allowed at this level: the configured endpoint is checked against
/// `allow_http` by the configuration, and the credential services of EC2 instances, ECS tasks
/// and EKS pods (for a bucket on AWS without a key in the configuration) speak plain http.
#[derive(Debug, Clone)]
pub struct BucketConnector {
    pub tls: rustls::ClientConfig,
    pub connect_timeout: Duration,
    /// From sending a request to its answer's headers (a body sent: one more second per
    /// 256 KiB of it).
    pub timeout: Duration,
}

impl HttpConnector for BucketConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(self.connect_timeout));
        tcp.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_CONNECTIONS)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(HttpClient::new(BucketHttp {
            client,
            timeout: self.timeout,
        }))
    }
}

#[derive(Debug)]
struct BucketHttp {
    client: Client<HttpsConnector<TcpConnector>, HttpRequestBody>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl HttpService for BucketHttp {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let sending = request.body().content_length() as u64;
        let mut limit = self.timeout + Duration::from_secs(sending / UPLOAD_BYTES_PER_SECOND);
        // Completing a multipart upload makes the store assemble the object first: a
        // multi-GiB one takes a while on some stores.
        if request.method() == http::Method::POST {
            limit = limit.max(COMPLETE_TIMES * self.timeout);
        }
        let answer = tokio::time::timeout(limit, self.client.request(request)).await;
        let response = match answer {
            Err(_) => {
                return Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    std::io::Error::other(format!("no answer within {limit:?}")),
                ))
            }
            Ok(Err(e)) => {
                // Not connected: safe to send again. Otherwise the request may have gone
                // out: sent again only when it is idempotent (not a multipart start or
                // completion).
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Interrupted
                };
                return Err(HttpError::new(kind, e));
            }
            Ok(Ok(response)) => response,
        };
        Ok(response.map(|body| {
            HttpResponseBody::new(body.map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e)))
        }))
    }
}
