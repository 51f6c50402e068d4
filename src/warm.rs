//! `warm`: pre-pulls images through a mirror's normal fill path, as a client would: the manifest
//! by tag, the platform manifests chosen (or all), then their configs and layers.

use crate::config::format_byte_size;
use crate::oci::{self, CANONICAL_MANIFEST_TYPES};
use crate::progress::Report;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Which platforms of a multi-platform image to fetch.
#[derive(Clone, Debug)]
pub enum Platforms {
    All,
    /// `os/arch` or `os/arch/variant`.
    Only(Vec<String>),
}

/// What a warm run fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub images: usize,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// The mirror path of an image reference (`alpine:3.20`, `docker.io/library/alpine:3.20`,
/// `ghcr.io/org/app@sha256:...`): (`/v2/<prefix><repo>`, reference).
pub fn image_path(image: &str, default_registry: &str) -> Result<(String, String), String> {
    let image_ref = oci::ImageRef::parse(image, Some(default_registry))
        .ok_or_else(|| format!("{image:?} is not an image reference"))?;
    let prefix = if image_ref.registry == default_registry {
        String::new()
    } else {
        format!("{}/", image_ref.registry)
    };
    Ok((
        format!("/v2/{prefix}{}", image_ref.repo),
        image_ref.reference.to_string(),
    ))
}

/// Pulls every image through the mirror at `base` (`http://host:port`), telling `progress` of
/// each image's blobs once its manifests are read and of their bytes as they arrive, and
/// `said` a line per image.
pub async fn warm(
    base: &str,
    images: &[String],
    default_registry: &str,
    platforms: &Platforms,
    progress: &dyn Report,
    said: &(dyn Fn(&str) + Sync),
) -> Result<Summary, String> {
    let http: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut summary = Summary::default();
    for image in images {
        let (path, reference) = image_path(image, default_registry)?;
        let before = summary.clone();
        let pulled = Pull {
            http: &http,
            base,
            path: &path,
            progress,
        };
        pulled
            .image(&reference, platforms, &mut summary)
            .await
            .map_err(|e| format!("{image}: {e}"))?;
        summary.images += 1;
        let (blobs, bytes) = (summary.blobs - before.blobs, summary.bytes - before.bytes);
        said(&format!(
            "warmed {image}: {} manifests, {blobs} blobs, {}",
            summary.manifests - before.manifests,
            format_byte_size(bytes)
        ));
    }
    Ok(summary)
}

/// One image's pull.
struct Pull<'a> {
    http: &'a HttpClient,
    base: &'a str,
    /// `/v2/<prefix><repo>`.
    path: &'a str,
    progress: &'a dyn Report,
}

impl Pull<'_> {
    async fn image(
        &self,
        reference: &str,
        platforms: &Platforms,
        summary: &mut Summary,
    ) -> Result<(), String> {
        let (base, path) = (self.base, self.path);
        let top = self
            .manifest(&format!("{base}{path}/manifests/{reference}"))
            .await?;
        summary.manifests += 1;
        let mut images = Vec::new();
        match platform_children(&top, platforms) {
            Some(children) => {
                for child in children {
                    images.push(
                        self.manifest(&format!("{base}{path}/manifests/{child}"))
                            .await?,
                    );
                    summary.manifests += 1;
                }
            }
            None => images.push(top),
        }
        let blobs: Vec<(crate::digest::Digest, Option<u64>)> =
            images.iter().flat_map(|m| oci::descriptors(m)).collect();
        let declared = blobs
            .iter()
            .filter_map(|(_, size)| *size)
            .fold(0u64, u64::saturating_add);
        self.progress.planned(blobs.len() as u64, declared);
        for (blob, _) in blobs {
            let bytes = self.blob(&format!("{base}{path}/blobs/{blob}")).await?;
            summary.blobs += 1;
            summary.bytes += bytes;
        }
        Ok(())
    }

    async fn manifest(&self, url: &str) -> Result<Bytes, String> {
        let response = send(self.http, url, true).await?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: download broke: {e}"))?
            .to_bytes();
        Ok(body)
    }

    /// Reads a blob to its end without keeping it (it may be several GiB); its length.
    async fn blob(&self, url: &str) -> Result<u64, String> {
        let mut body = send(self.http, url, false).await?.into_body();
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{url}: download broke: {e}"))?;
            if let Some(data) = frame.data_ref() {
                read += data.len() as u64;
                self.progress.done(0, data.len() as u64);
            }
        }
        self.progress.done(1, 0);
        Ok(read)
    }
}

/// The child manifests of an index that match the platforms, or `None` for a single image.
fn platform_children(manifest: &[u8], platforms: &Platforms) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Platform {
        os: String,
        architecture: String,
        variant: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Child {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Option<Vec<Child>>,
    }
    let children = serde_json::from_slice::<Index>(manifest).ok()?.manifests?;
    Some(
        children
            .into_iter()
            .filter(|c| match (platforms, &c.platform) {
                (Platforms::All, _) => true,
                (Platforms::Only(_), None) => false,
                (Platforms::Only(wanted), Some(p)) => {
                    let short = format!("{}/{}", p.os, p.architecture);
                    let long = p.variant.as_ref().map(|v| format!("{short}/{v}"));
                    wanted
                        .iter()
                        .any(|w| *w == short || Some(w) == long.as_ref())
                }
            })
            .map(|c| c.digest)
            .collect(),
    )
}

/// Sends a GET; an answer other than 200 is an error naming its status and body.
async fn send(
    http: &HttpClient,
    url: &str,
    manifest: bool,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let mut request = Request::get(url);
    if manifest {
        request = request.header(header::ACCEPT, CANONICAL_MANIFEST_TYPES.join(", "));
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = http
        .request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response);
    }
    // The start of what it said, at most 64 KiB.
    let mut body = Vec::new();
    let mut frames = response.into_body();
    while let Some(Ok(frame)) = frames.frame().await {
        if let Some(data) = frame.data_ref() {
            let room = (64 * 1024usize).saturating_sub(body.len());
            body.extend_from_slice(&data[..data.len().min(room)]);
        }
        if body.len() >= 64 * 1024 {
            break;
        }
    }
    Err(format!(
        "{url}: {status}: {}",
        String::from_utf8_lossy(&body)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths() {
        let p = |i| image_path(i, "docker.io").unwrap();
        assert_eq!(
            p("alpine:3.20"),
            ("/v2/library/alpine".into(), "3.20".into())
        );
        assert_eq!(
            p("docker.io/library/alpine"),
            ("/v2/library/alpine".into(), "latest".into())
        );
        assert_eq!(
            p("ghcr.io/org/app:1"),
            ("/v2/ghcr.io/org/app".into(), "1".into())
        );
        let d = crate::digest::Digest::of(b"x");
        assert_eq!(
            p(&format!("localhost:5000/app@{d}")),
            ("/v2/localhost:5000/app".into(), d.to_string())
        );
        assert!(image_path("Bad/Name", "docker.io").is_err());
    }

    #[test]
    fn picks_platforms() {
        let index = br#"{"manifests":[
            {"digest":"sha256:a","platform":{"os":"linux","architecture":"amd64"}},
            {"digest":"sha256:b","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"digest":"sha256:c"}]}"#;
        let only = |p: &[&str]| Platforms::Only(p.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            platform_children(index, &only(&["linux/amd64"])),
            Some(vec!["sha256:a".into()])
        );
        assert_eq!(
            platform_children(index, &only(&["linux/arm64/v8"])),
            Some(vec!["sha256:b".into()])
        );
        assert_eq!(
            platform_children(index, &Platforms::All).map(|c| c.len()),
            Some(3)
        );
        assert_eq!(
            platform_children(br#"{"layers":[]}"#, &Platforms::All),
            None
        );
    }
}
