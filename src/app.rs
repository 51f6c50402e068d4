//! Shared state of a running mirror: the configuration, the routing table, one upstream per
//! registry, the cache and the counters. A reload builds a new generation around the same cache
//! and counters ([`Live`]); requests in flight finish on the generation they started with.

use crate::access::{Access, Sessions};
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::console::Console;
use crate::metrics::{EndpointLabels, Metrics};
use crate::proxy::Prefetcher;
use crate::route::RegistryName;
use crate::shared::SharedStore;
use crate::upstream::{Memory, RegistryUpstream};
use std::sync::{Arc, RwLock};

pub struct App {
    config: Config,
    /// Registry names as routing sees them, in configuration order.
    routes: Vec<RegistryName>,
    /// The upstream side of each registry, in configuration order.
    upstreams: Vec<Arc<RegistryUpstream>>,
    /// Shared by every configuration generation (one store, one set of counters).
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// The operator console's own state (pull counts, the last hour).
    console: Arc<Console>,
    /// Client authentication and access rules, when `[auth]` is configured.
    access: Option<Access>,
    /// Logins and tokens, kept across reloads.
    sessions: Arc<Sessions>,
    /// Downloads of an image's blobs started ahead of its client.
    prefetcher: Prefetcher,
    /// The bucket shared with other replicas, when `[shared_store]` is configured (opened at
    /// start; a reload keeps it).
    shared: Option<Arc<SharedStore>>,
    /// The other replicas, when `[cluster]` is configured (a reload keeps them).
    cluster: Option<Arc<Cluster>>,
}

impl App {
    /// Opens the cache directory (purging leftovers of an earlier run) and builds the clients.
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let metrics = Arc::new(Metrics::new(&endpoint_labels(&config)));
        let cache = Arc::new(
            Cache::open(&config.cache)
                .map_err(|e| format!("cannot open the cache directory: {e}"))?,
        );
        let shared = config
            .shared_store
            .as_ref()
            .map(|c| SharedStore::open(c, Arc::clone(&metrics)).map(Arc::new))
            .transpose()
            .map_err(|e| e.to_string())?;
        let cluster = config
            .cluster
            .as_ref()
            .map(|c| {
                let cluster = Cluster::new(c, config.cache.max_downloads, Arc::clone(&metrics));
                cluster.map(|cluster| {
                    let cluster = Arc::new(cluster);
                    cluster.follow_dns();
                    cluster
                })
            })
            .transpose()?;
        let console = Console::start(&metrics);
        Ok(Arc::new(App::assemble(
            config,
            cache,
            metrics,
            console,
            Arc::default(),
            &[],
            (shared, cluster),
        )?))
    }

    fn assemble(
        config: Config,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        console: Arc<Console>,
        sessions: Arc<Sessions>,
        known_endpoints: &[Arc<Memory>],
        (shared, cluster): (Option<Arc<SharedStore>>, Option<Arc<Cluster>>),
    ) -> Result<App, String> {
        let routes = config
            .registry
            .iter()
            .map(|r| RegistryName {
                name: r.name.clone(),
                is_default: r.default,
                library_prefix: r.name == "docker.io",
            })
            .collect();
        let upstreams = config
            .registry
            .iter()
            .map(|r| RegistryUpstream::new(r, Arc::clone(&metrics), known_endpoints).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let access = config
            .auth
            .as_ref()
            .map(|auth| Access::load(auth, &config.registry, Arc::clone(&sessions)))
            .transpose()?;
        Ok(App {
            prefetcher: Prefetcher::new(config.cache.prefetch_downloads),
            config,
            routes,
            upstreams,
            cache,
            metrics,
            console,
            access,
            sessions,
            shared,
            cluster,
        })
    }

    /// The same mirror under a new configuration: registries, upstreams, credentials, TTLs,
    /// budget and pins change; the cache, its directory, the counters and what unchanged
    /// upstream endpoints taught carry over. Settings
    /// that need a restart (listen address, cache directory) are kept and reported.
    pub fn reconfigured(&self, mut config: Config) -> Result<App, String> {
        config.validate().map_err(|e| e.to_string())?;
        if config.server.listen != self.config.server.listen {
            tracing::warn!(old = %self.config.server.listen, new = %config.server.listen, "server.listen changes only on restart");
            config.server.listen = self.config.server.listen;
        }
        if config.cache.dir != self.config.cache.dir {
            tracing::warn!(old = %self.config.cache.dir.display(), new = %config.cache.dir.display(), "cache.dir changes only on restart");
            config.cache.dir = self.config.cache.dir.clone();
        }
        if config.shared_store.as_ref() != self.shared.as_ref().map(|s| s.config()) {
            tracing::warn!("shared_store changes only on restart");
            config.shared_store = self.shared.as_ref().map(|s| s.config().clone());
        }
        if config.cluster.as_ref() != self.cluster.as_ref().map(|c| c.config()) {
            tracing::warn!("cluster changes only on restart");
            config.cluster = self.cluster.as_ref().map(|c| c.config().clone());
        }
        let cache_config = config.cache.clone();
        let labels = endpoint_labels(&config);
        // What upstream endpoints taught (health, rate-limit pauses, tokens) carries over to
        // those whose URL and credentials did not change.
        let known: Vec<Arc<Memory>> = self.upstreams.iter().flat_map(|u| u.memories()).collect();
        // Everything that can fail (files, CAs) before anything shared changes.
        let next = App::assemble(
            config,
            Arc::clone(&self.cache),
            Arc::clone(&self.metrics),
            Arc::clone(&self.console),
            Arc::clone(&self.sessions),
            &known,
            (self.shared.clone(), self.cluster.clone()),
        )?;
        self.cache
            .reconfigure(&cache_config)
            .map_err(|e| e.to_string())?;
        self.metrics.add_endpoints(&labels);
        Ok(next)
    }

    /// The access rules, when clients must authenticate.
    pub fn access(&self) -> Option<&Access> {
        self.access.as_ref()
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

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn prefetcher(&self) -> &Prefetcher {
        &self.prefetcher
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The bucket shared with other replicas, if any.
    pub fn shared(&self) -> Option<&Arc<SharedStore>> {
        self.shared.as_ref()
    }

    /// The other replicas, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The operator console's state.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The Prometheus text, with the gauges that mirror other modules' state brought up to date.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let lifecycle = self.cache.lifecycle();
        let usage = lifecycle.usage();
        m.cache_size.set(usage.on_disk() as i64);
        m.cache_objects
            .with_label_values(&["blob"])
            .set(usage.blobs as i64);
        m.cache_objects
            .with_label_values(&["manifest"])
            .set(usage.manifests as i64);
        m.commits_waiting.set(self.cache.pacer().waiting() as i64);
        m.fills_in_flight
            .set(self.cache.downloads_in_flight() as i64);
        m.downloads_queued
            .set(self.cache.download_slots().queued() as i64);
        m.download_slots.set(self.config.cache.max_downloads as i64);
        m.shared_store_up
            .set(self.shared.as_ref().map_or(-1, |s| i64::from(s.is_up())));
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

fn endpoint_labels(config: &Config) -> Vec<EndpointLabels> {
    config
        .registry
        .iter()
        .map(|r| EndpointLabels {
            registry: r.name.clone(),
            endpoints: r.upstream.iter().map(|u| endpoint_label(&u.url)).collect(),
        })
        .collect()
}

/// The running configuration generation, swapped whole by a reload; each request keeps the
/// generation it started with.
pub struct Live {
    current: RwLock<Arc<App>>,
}

impl Live {
    pub fn new(app: Arc<App>) -> Arc<Live> {
        Arc::new(Live {
            current: RwLock::new(app),
        })
    }

    pub fn get(&self) -> Arc<App> {
        Arc::clone(&self.current.read().expect("live lock poisoned"))
    }

    /// Switches to a new configuration, or keeps the running one and says why not.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let previous = self.get();
        let next = previous.reconfigured(config)?;
        let registries: Vec<String> = next.routes.iter().map(|r| r.name.clone()).collect();
        *self.current.write().expect("live lock poisoned") = Arc::new(next);
        // Downloads it started go on; what it still meant to start, the new one decides.
        previous.prefetcher().stop();
        tracing::info!(?registries, "configuration reloaded");
        Ok(())
    }
}

/// An endpoint's label: its URL without a trailing slash (as `RegistryUpstream` names it).
pub fn endpoint_label(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}
