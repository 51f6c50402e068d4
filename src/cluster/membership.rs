//! Who the peers are — the configured list, or every address `peers_dns` names, looked up
//! again every `recheck_after` — which of them is this replica, and what this replica knows of
//! each (skipped until when). A lookup that fails keeps the peers known; a peer that leaves
//! takes its health and its metrics with it.
//!
//! This replica may have several addresses among the peers (a name with an IPv4 and an IPv6
//! address for every pod): all of them are its own, so that it never asks itself, and asking
//! still only goes up the order every replica computes alike.

use super::Cluster;
use crate::config::{peer_address, ClusterConfig};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

/// One peer and what this replica knows of it.
#[derive(Debug)]
pub struct Peer {
    /// Its address without a trailing slash, as configured or looked up.
    address: String,
    /// Skipped until then after it failed to answer.
    down_until: Mutex<Option<Instant>>,
    /// No longer a peer (a request that started before may still hold it); held while its
    /// metrics series are written or removed, so that none comes back once it left.
    left: Mutex<bool>,
}

impl Peer {
    fn new(address: String) -> Peer {
        Peer {
            address,
            down_until: Mutex::new(None),
            left: Mutex::new(false),
        }
    }

    /// Runs `update` (of its metrics series) unless it left the peers.
    pub(super) fn while_member(&self, update: impl FnOnce()) {
        let left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if !*left {
            update();
        }
    }

    /// It left the peers: `remove` (its metrics series) runs, and no update after it.
    fn leave(&self, remove: impl FnOnce()) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        *left = true;
        remove();
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub(super) fn is_up(&self) -> bool {
        let mut down = self.down_until.lock().expect("peer lock");
        match *down {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *down = None;
                true
            }
            None => true,
        }
    }

    /// Skipped until `until`; whether it was up before.
    pub(super) fn down_until(&self, until: Instant) -> bool {
        self.down_until
            .lock()
            .expect("peer lock")
            .replace(until)
            .is_none()
    }

    pub(super) fn answered(&self) {
        self.down_until.lock().expect("peer lock").take();
    }
}

/// The peers at one time, and which of them is this replica.
#[derive(Default)]
pub(super) struct Members {
    pub peers: Vec<Arc<Peer>>,
    /// This replica's indices in `peers`: none while it is not among them (the name was not
    /// looked up yet, or does not name it yet), when it asks peers as one outside would.
    own: Vec<usize>,
}

impl Members {
    /// `addresses` (duplicates once), `own` those of them that are this replica's, keeping
    /// what `previous` knew of the peers still there.
    pub fn new(addresses: &[String], own: &[String], previous: &Members) -> Members {
        let mut peers: Vec<Arc<Peer>> = Vec::new();
        for address in addresses.iter().map(|a| peer_address(a)) {
            if peers.iter().any(|p| p.address == address) {
                continue;
            }
            let known = previous.peers.iter().find(|p| p.address == address);
            peers.push(known.map_or_else(|| Arc::new(Peer::new(address.to_string())), Arc::clone));
        }
        let own = (0..peers.len())
            .filter(|&i| own.iter().any(|o| peer_address(o) == peers[i].address))
            .collect();
        Members { peers, own }
    }

    /// Whether `peers[index]` is this replica.
    pub fn is_own(&self, index: usize) -> bool {
        self.own.contains(&index)
    }

    /// The peers in the order they own `key`: highest rendezvous score first.
    pub fn owners(&self, key: &str) -> Vec<usize> {
        let mut scored: Vec<(u64, usize)> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, peer)| (super::rendezvous_score(&peer.address, key), i))
            .collect();
        scored.sort_unstable_by(|a, b| b.cmp(a));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    fn addresses(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.address.clone()).collect()
    }
}

/// The peers of a configuration with a `peers` list, this replica among them (`self`, or the
/// peer named after this host).
pub(super) fn listed(config: &ClusterConfig) -> Result<Members, String> {
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let own = config.own_address(&hostname).map_err(|e| e.to_string())?;
    let members = Members::new(&config.peers, &[own.to_string()], &Members::default());
    if members.own.is_empty() {
        return Err("cluster.self is not one of cluster.peers".into());
    }
    tracing::info!(own, peers = members.peers.len(), "cluster: peers known");
    Ok(members)
}

impl Cluster {
    /// With `peers_dns`: looks the name up now and every `recheck_after` while the cluster
    /// lives (from a task of the current runtime; without one, nothing happens).
    pub fn follow_dns(self: &Arc<Self>) {
        let Some((scheme, host, port)) = self.config.dns_name() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("cluster: no runtime to look the peers up from; asking upstream only");
            return;
        };
        let (scheme, host) = (scheme.to_string(), host.to_string());
        let cluster: Weak<Cluster> = Arc::downgrade(self);
        let every = self.config.recheck_after;
        runtime.spawn(async move {
            loop {
                let found = tokio::net::lookup_host((host.as_str(), port)).await;
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                match found {
                    Ok(found) => {
                        let ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
                        cluster.looked_up(&scheme, port, &ips);
                    }
                    Err(e) => {
                        tracing::warn!(name = %host, error = %e, "cluster: cannot look the peers up; keeping those known");
                    }
                }
                drop(cluster);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The peers are now the addresses `ips`, this replica those that are its own (`self`'s,
    /// or those it can bind).
    fn looked_up(&self, scheme: &str, port: u16, ips: &[IpAddr]) {
        let url = |ip: &IpAddr| match ip {
            IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
            IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
        };
        let mut ips = ips.to_vec();
        ips.sort();
        ips.dedup();
        if ips.len() > MAX_PEERS {
            // Every replica keeps the same ones: the lowest addresses.
            tracing::warn!(
                found = ips.len(),
                kept = MAX_PEERS,
                "cluster: more peers than kept"
            );
            ips.truncate(MAX_PEERS);
        }
        let own_ip = self.config.dns_self_ip();
        let own: Vec<String> = ips
            .iter()
            .filter(|ip| own_ip.map_or_else(|| is_local(ip), |own| **ip == own))
            .map(url)
            .collect();
        let addresses: Vec<String> = ips.iter().map(url).collect();
        let previous = self.members();
        let members = Arc::new(Members::new(&addresses, &own, &previous));
        let before = previous.addresses();
        if before == addresses && previous.own == members.own {
            return;
        }
        // New peers' series first: a request that marks one down once it is published
        // is not undone.
        let new: Vec<String> = addresses
            .iter()
            .filter(|a| !before.contains(a))
            .cloned()
            .collect();
        self.metrics.cluster_configured(&new);
        *self.members.write().expect("members lock") = Arc::clone(&members);
        for peer in &previous.peers {
            if !addresses.iter().any(|a| a == peer.address()) {
                peer.leave(|| self.metrics.peer_gone(peer.address()));
            }
        }
        tracing::info!(peers = ?addresses, own = ?own, "cluster: peers looked up");
    }
}

/// The most peers a look-up keeps (each request hashes every peer's address).
const MAX_PEERS: usize = 256;

/// Whether `ip` is one of this machine's addresses (it can be bound).
fn is_local(ip: &IpAddr) -> bool {
    std::net::TcpListener::bind((*ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_what_was_known_of_a_peer_still_there_and_find_their_own() {
        let first = Members::new(
            &[
                "http://10.0.0.1:5000".into(),
                "http://10.0.0.2:5000/".into(),
            ],
            &["http://10.0.0.2:5000".into()],
            &Members::default(),
        );
        assert_eq!(first.own, [1]);
        first.peers[0].down_until(Instant::now() + std::time::Duration::from_secs(60));
        let second = Members::new(
            &["http://10.0.0.3:5000".into(), "http://10.0.0.1:5000".into()],
            &[],
            &first,
        );
        assert!(second.own.is_empty());
        assert_eq!(
            second.addresses(),
            ["http://10.0.0.3:5000", "http://10.0.0.1:5000"]
        );
        assert!(second.peers[0].is_up());
        assert!(!second.peers[1].is_up(), "10.0.0.1 was down and still is");
    }

    #[test]
    fn peers_looked_up_again_keep_their_health_and_those_gone_leave_the_metrics() {
        let config: ClusterConfig = toml::from_str(
            "peers_dns = \"regmirror-peers.example:5000\"\nsecret = \"a-cluster-secret-of-some-length\"",
        )
        .unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new(&[]));
        let cluster = Cluster::new(&config, 4, Arc::clone(&metrics)).unwrap();
        // Before the first look-up: no peers, nothing owned elsewhere.
        let digest = crate::digest::Digest::of(b"x");
        assert!(cluster.peers().is_empty());
        assert!(!cluster.owned_elsewhere(&digest));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        cluster.looked_up("http", 5000, &[ip("10.9.9.9"), ip("127.0.0.1")]);
        let peers = cluster.peers();
        assert_eq!(peers.len(), 2);
        // This replica is the address that is this machine's own.
        assert!(peers.contains(&("http://127.0.0.1:5000".into(), true, true)));
        let gone = "http://10.9.9.9:5000";
        assert!(metrics.render().contains(gone));
        let members = cluster.members();
        let far = members.peers.iter().find(|p| p.address() == gone).unwrap();
        cluster.mark_down(far, "test");
        cluster.looked_up(
            "http",
            5000,
            &[ip("10.9.9.8"), ip("10.9.9.9"), ip("127.0.0.1")],
        );
        let peers = cluster.peers();
        assert_eq!(peers.len(), 3);
        assert!(
            peers.contains(&(gone.into(), false, false)),
            "still down: {peers:?}"
        );
        cluster.looked_up("http", 5000, &[ip("10.9.9.8"), ip("127.0.0.1")]);
        assert_eq!(cluster.peers().len(), 2);
        assert!(!metrics.render().contains(gone), "its series are gone");
        // A request that outlived its peer's membership brings no series back.
        cluster.failed(far, "late");
        assert!(!metrics.render().contains(gone));
        // Every address of this machine is this replica (a name with two addresses for it).
        cluster.looked_up(
            "http",
            5000,
            &[ip("127.0.0.2"), ip("10.9.9.8"), ip("127.0.0.1")],
        );
        let own: Vec<String> = cluster
            .peers()
            .into_iter()
            .filter(|p| p.1)
            .map(|p| p.0)
            .collect();
        assert_eq!(own, ["http://127.0.0.1:5000", "http://127.0.0.2:5000"]);
    }

    #[test]
    fn with_self_only_that_address_is_this_replica() {
        let config: ClusterConfig = toml::from_str(
            "peers_dns = \"peers.example:5000\"\nself = \"http://10.9.9.7:5000\"\n\
             secret = \"a-cluster-secret-of-some-length\"",
        )
        .unwrap();
        let cluster =
            Cluster::new(&config, 4, Arc::new(crate::metrics::Metrics::new(&[]))).unwrap();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        cluster.looked_up("http", 5000, &[ip("127.0.0.1"), ip("10.9.9.7")]);
        let peers = cluster.peers();
        assert!(peers.contains(&("http://10.9.9.7:5000".into(), true, true)));
        assert!(peers.contains(&("http://127.0.0.1:5000".into(), false, true)));
    }

    #[test]
    fn only_this_machines_addresses_are_local() {
        assert!(is_local(&"127.0.0.1".parse().unwrap()));
        assert!(!is_local(&"192.0.2.1".parse().unwrap()));
    }
}
