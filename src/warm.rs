//! `warm`: pre-pulls images through a mirror's normal fill path, as a client would: the manifest
//! by tag, the platform manifests chosen (or all), then their configs and layers.

use crate::config::format_byte_size;
use crate::oci::{self, CANONICAL_MANIFEST_TYPES};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::io::IsTerminal;

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

/// Pulls every image through the mirror at `base` (`http://host:port`).
pub async fn warm(
    base: &str,
    images: &[String],
    default_registry: &str,
    platforms: &Platforms,
) -> Result<Summary, String> {
    let http: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let progress = std::io::stderr().is_terminal();
    let mut summary = Summary::default();
    for image in images {
        let (path, reference) = image_path(image, default_registry)?;
        let before = summary.clone();
        warm_image(&http, base, &path, &reference, platforms, &mut summary)
            .await
            .map_err(|e| format!("{image}: {e}"))?;
        summary.images += 1;
        let (blobs, bytes) = (summary.blobs - before.blobs, summary.bytes - before.bytes);
        eprintln!(
            "warmed {image}: {} manifests, {blobs} blobs, {}",
            summary.manifests - before.manifests,
            format_byte_size(bytes)
        );
        if progress {
            eprintln!(
                "  total so far: {} images, {}",
                summary.images,
                format_byte_size(summary.bytes)
            );
        }
    }
    Ok(summary)
}

async fn warm_image(
    http: &HttpClient,
    base: &str,
    path: &str,
    reference: &str,
    platforms: &Platforms,
    summary: &mut Summary,
) -> Result<(), String> {
    let top = get(http, &format!("{base}{path}/manifests/{reference}"), true).await?;
    summary.manifests += 1;
    let mut images = Vec::new();
    match platform_children(&top, platforms) {
        Some(children) => {
            for child in children {
                images.push(get(http, &format!("{base}{path}/manifests/{child}"), true).await?);
                summary.manifests += 1;
            }
        }
        None => images.push(top),
    }
    for manifest in images {
        for blob in oci::references(&manifest) {
            let bytes = get(http, &format!("{base}{path}/blobs/{blob}"), false).await?;
            summary.blobs += 1;
            summary.bytes += bytes.len() as u64;
        }
    }
    Ok(())
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

async fn get(http: &HttpClient, url: &str, manifest: bool) -> Result<Bytes, String> {
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
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: download broke: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "{url}: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body)
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
