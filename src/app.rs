//! Shared state of a running mirror: the configuration, the routing table, one upstream per
//! registry and the cache. Built once at start-up and shared by every connection.

use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::{EndpointLabels, Metrics};
use crate::route::RegistryName;
use crate::status::Popularity;
use crate::upstream::RegistryUpstream;
use std::io;
use std::sync::Arc;

pub struct App {
    config: Config,
    /// Registry names as routing sees them, in configuration order.
    routes: Vec<RegistryName>,
    /// The upstream side of each registry, in configuration order.
    upstreams: Vec<Arc<RegistryUpstream>>,
    cache: Cache,
    metrics: Arc<Metrics>,
    popularity: Popularity,
}

impl App {
    /// Opens the cache directory (purging leftovers of an earlier run) and builds the clients.
    pub fn new(config: Config) -> io::Result<Arc<App>> {
        let routes = config
            .registry
            .iter()
            .map(|r| RegistryName {
                name: r.name.clone(),
                is_default: r.default,
                library_prefix: r.name == "docker.io",
            })
            .collect();
        let labels: Vec<EndpointLabels> = config
            .registry
            .iter()
            .map(|r| EndpointLabels {
                registry: r.name.clone(),
                endpoints: r.upstream.iter().map(|u| endpoint_label(&u.url)).collect(),
            })
            .collect();
        let metrics = Arc::new(Metrics::new(&labels));
        let upstreams = config
            .registry
            .iter()
            .map(|r| Arc::new(RegistryUpstream::new(r, Arc::clone(&metrics))))
            .collect();
        let cache = Cache::open(&config.cache)?;
        Ok(Arc::new(App {
            config,
            routes,
            upstreams,
            cache,
            metrics,
            popularity: Popularity::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn routes(&self) -> &[RegistryName] {
        &self.routes
    }

    pub fn upstream(&self, registry: usize) -> &Arc<RegistryUpstream> {
        &self.upstreams[registry]
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Pull counts per image, for the status page.
    pub fn popularity(&self) -> &Popularity {
        &self.popularity
    }

    /// The Prometheus text, with the gauges that mirror other modules' state brought up to date.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let lifecycle = self.cache.lifecycle();
        let usage = lifecycle.usage();
        m.cache_size.set(usage.blob_bytes as i64);
        m.cache_objects
            .with_label_values(&["blob"])
            .set(usage.blobs as i64);
        m.cache_objects
            .with_label_values(&["manifest"])
            .set(usage.manifests as i64);
        m.fills_in_flight.set(self.cache.fills_in_flight() as i64);
        let evicted = lifecycle.evictions();
        m.evictions
            .inc_by(evicted.saturating_sub(m.evictions.get()));
        for upstream in &self.upstreams {
            for endpoint in upstream.status() {
                let labels = [upstream.name.as_str(), endpoint.url.as_str()];
                m.upstream_up
                    .with_label_values(&labels)
                    .set(i64::from(endpoint.health.up));
                if let Some(remaining) = endpoint.health.rate_limit.and_then(|r| r.remaining) {
                    m.ratelimit_remaining
                        .with_label_values(&labels)
                        .set(remaining as i64);
                }
            }
        }
        m.render()
    }
}

/// An endpoint's label: its URL without a trailing slash (as `RegistryUpstream` names it).
pub fn endpoint_label(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}
