//! Shared state of a running mirror: the configuration, the routing table, one upstream per
//! registry and the cache. Built once at start-up and shared by every connection.

use crate::cache::Cache;
use crate::config::Config;
use crate::route::RegistryName;
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
        let upstreams = config
            .registry
            .iter()
            .map(|r| Arc::new(RegistryUpstream::new(r)))
            .collect();
        let cache = Cache::open(&config.cache)?;
        Ok(Arc::new(App {
            config,
            routes,
            upstreams,
            cache,
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
}
