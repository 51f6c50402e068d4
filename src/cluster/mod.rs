//! The cluster: replicas sharing one bucket that know each other (`[cluster]`), so that each
//! digest is fetched from upstream by one of them for the whole fleet. This module owns who
//! owns what, asking the owner, and the peers' health.
//!
//! Each digest has an owner, chosen by rendezvous hashing over the peers (every replica
//! computes the same order from the same list, with no coordination): on a miss in its disk
//! and the bucket, a replica that does not own the digest asks its owner, which runs the
//! single-flight download and streams the blob to it as it streams to its own clients. What a
//! peer sends is verified like any source's bytes. A peer that does not answer in time is
//! skipped for `recheck_after`, and the next in the order is asked (every replica skips it
//! alike, so the next is the owner for all): availability first, deduplication second. When
//! this replica comes first among the live peers, it owns the digest and asks upstream.
//!
//! Peer requests are signed with the cluster secret ([`signature`]); the signature is also the
//! hop marker: a download started for a peer never asks another peer.

mod manifests;
mod membership;
mod tags;
pub use membership::Peer;
pub use tags::{OwnerTag, TagFromOwner};
pub mod signature;

use crate::cache::slots::DownloadSlots;
use crate::config::ClusterConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::oci::RepoName;
use crate::upstream::{http_client, HttpClient, USER_AGENT};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use membership::Members;
use sha2::{Digest as _, Sha256};
use signature::{Signer, INSTANCE_HEADER, PEER_HEADER, REFUSED_HEADER};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// This replica's peers and how to ask them.
pub struct Cluster {
    config: ClusterConfig,
    /// The peers now (a list, or what `peers_dns` named when last looked up).
    members: RwLock<Arc<Members>>,
    signer: Signer,
    http: HttpClient,
    metrics: Arc<Metrics>,
    slots: Arc<DownloadSlots>,
    instance: String,
}

/// How one request to a peer went.
pub(crate) enum Asked<T> {
    Got(T),
    /// It answered without it, or did not in time: upstream is asked directly.
    Declined,
    /// It could not be reached: the next owner is asked.
    Unreachable(String),
}

impl Asked<()> {
    /// The same outcome, for an answer that brought nothing.
    fn nothing<T>(self) -> Asked<T> {
        match self {
            Asked::Got(()) | Asked::Declined => Asked::Declined,
            Asked::Unreachable(e) => Asked::Unreachable(e),
        }
    }
}

/// A blob as a peer sends it: its bytes, unverified, and its declared size.
pub struct PeerBlob {
    pub bytes: BoxStream<'static, Result<Bytes, String>>,
    pub size: u64,
    /// The peer, for [`Cluster::failed`] and [`Cluster::sent_corrupt`].
    pub peer: Arc<Peer>,
    /// The peer's address, for logs.
    pub label: String,
}

impl Cluster {
    /// The cluster of a validated configuration whose secret is loaded; downloads read from
    /// peers take `max_downloads` slots of their own.
    pub fn new(
        config: &ClusterConfig,
        max_downloads: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, String> {
        let secret = config
            .secret
            .as_ref()
            .ok_or("cluster: the secret is not loaded")?;
        // With peers_dns, the peers come with the first look-up ([`Cluster::follow_dns`]).
        let members = match config.peers_dns {
            Some(_) => Members::default(),
            None => membership::listed(config)?,
        };
        let tls = crate::tls::client_config(None, true).map_err(|e| format!("cluster: {e}"))?;
        let addresses: Vec<String> = members.peers.iter().map(|p| p.address().into()).collect();
        metrics.cluster_configured(&addresses);
        Ok(Cluster {
            config: config.clone(),
            members: RwLock::new(Arc::new(members)),
            signer: Signer::new(secret.expose()),
            http: http_client(CONNECT_TIMEOUT, tls),
            metrics,
            slots: Arc::new(DownloadSlots::new(max_downloads)),
            instance: instance_id(),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// What signs and checks peer requests.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// How long a blob from a peer may go without a byte.
    pub fn stall_timeout(&self) -> Duration {
        self.config.stall_timeout
    }

    /// Every peer's address, whether it is this replica, and whether it is up (this replica
    /// always is).
    pub fn peers(&self) -> Vec<(String, bool, bool)> {
        let members = self.members();
        let own = |i| members.is_own(i);
        members
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.address().to_string(), own(i), own(i) || p.is_up()))
            .collect()
    }

    /// The peers now.
    fn members(&self) -> Arc<Members> {
        Arc::clone(&self.members.read().expect("members lock"))
    }

    /// The blob from the live peer that owns it, unless this replica does (then `None`: it
    /// asks upstream itself). A peer that cannot be reached is skipped from now on and the
    /// next owner asked; one that answers otherwise than with the blob (it does not have it,
    /// upstream refused it) is taken at its word: `None`, and upstream is asked directly.
    pub async fn read_blob(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<PeerBlob> {
        let path = peer_path(registry, &format!("{repo}/blobs/{digest}"));
        self.ask_owner(&digest.to_string(), |peer| {
            self.ask_blob(peer, &path, digest)
        })
        .await
    }

    /// What `ask` gets from the live peer that owns `key` (a digest, or a tag), unless this
    /// replica does.
    ///
    /// Asking never goes round in a circle: a replica asks only a peer that comes before it
    /// in the key's order (the same for all replicas), whatever each believes is down. A
    /// peer's request may join a load the asked replica started for its own client, which
    /// asks a peer further ahead; loads for a peer never ask (the hop rule), and a tag's load
    /// may wait on a manifest's, never the other way round.
    pub(crate) async fn ask_owner<T, F: std::future::Future<Output = Asked<T>>>(
        &self,
        key: &str,
        ask: impl Fn(Arc<Peer>) -> F,
    ) -> Option<T> {
        let members = self.members();
        for i in members.owners(key) {
            if members.is_own(i) {
                return None;
            }
            let peer = &members.peers[i];
            if !peer.is_up() {
                continue;
            }
            match ask(Arc::clone(peer)).await {
                Asked::Got(got) => return Some(got),
                Asked::Declined => return None,
                Asked::Unreachable(e) => self.failed(peer, &e),
            }
        }
        None
    }

    /// Whether another live peer owns `digest`: this replica's download of it reads from
    /// that peer, under [`Cluster::slots`].
    pub fn owned_elsewhere(&self, digest: &Digest) -> bool {
        let members = self.members();
        members
            .owners(&digest.to_string())
            .into_iter()
            .find(|&i| members.is_own(i) || members.peers[i].is_up())
            .is_some_and(|owner| !members.is_own(owner))
    }

    /// The download slots of downloads read from the owner, apart from those that read from
    /// the bucket or upstream: a replica's slots never wait on another's, so two replicas
    /// each waiting on the other for a slot cannot happen.
    pub fn slots(&self) -> &Arc<DownloadSlots> {
        &self.slots
    }

    /// This process's instance: a peer request carrying it came from this very replica (a
    /// peer listed twice under other names).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A signed GET of `path` to `peer`: its answer, or how it went otherwise (a peer that
    /// refuses this replica is skipped from now on).
    async fn get(&self, peer: &Peer, path: &str) -> Result<Response<Incoming>, Asked<()>> {
        let signature = self.signer.sign(&http::Method::GET, path);
        self.send(peer, Request::get(path), &signature, true).await
    }

    /// `request` (a method and a path) to `peer` with `signature` (of that method and path):
    /// its answer if it is a 200 (or a 304). A refusal by the cluster marks the peer down when
    /// `refusal_marks_down` (a request every version of a peer accepts).
    async fn send(
        &self,
        peer: &Peer,
        request: http::request::Builder,
        signature: &http::HeaderValue,
        refusal_marks_down: bool,
    ) -> Result<Response<Incoming>, Asked<()>> {
        let address = peer.address();
        let path = request
            .uri_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let request = request
            .uri(format!("{address}{path}"))
            .header(header::USER_AGENT, USER_AGENT)
            .header(PEER_HEADER, signature)
            .header(INSTANCE_HEADER, &self.instance)
            .body(Empty::new())
            .map_err(|_| Asked::Unreachable(format!("cannot build a request to {address}")))?;
        let response = match tokio::time::timeout(self.config.timeout, self.http.request(request))
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let e = crate::upstream::error_chain(&e);
                return Err(Asked::Unreachable(format!("{address}: {e}")));
            }
            // Up but slow (its upstream is, or its downloads are all busy): this one
            // comes from upstream directly, and the owner stays in use.
            Err(_) => {
                tracing::info!(peer = %address, %path, timeout = ?self.config.timeout, "the owner did not answer in time; asking upstream directly");
                self.sent(peer, "slow");
                return Err(Asked::Declined);
            }
        };
        let status = response.status();
        if response.headers().contains_key(REFUSED_HEADER) {
            // It refuses this replica: another secret, clocks apart, or this very replica
            // under another name. (A 401 or 403 without the header is upstream's refusal,
            // passed on: declined, the peer stays in use.)
            self.sent(peer, "refused");
            if refusal_marks_down {
                self.mark_down(peer, &format!("it refused a cluster request: {status}"));
            }
            return Err(Asked::Declined);
        }
        peer.answered();
        self.set_up(peer, true);
        // Not modified: a tag still points to the manifest the asking replica has.
        if status != StatusCode::OK && status != StatusCode::NOT_MODIFIED {
            tracing::debug!(peer = %address, %path, %status, "the owner did not send it; asking upstream");
            self.sent(peer, "declined");
            return Err(Asked::Declined);
        }
        Ok(response)
    }

    /// One blob request to `peer`.
    async fn ask_blob(&self, peer: Arc<Peer>, path: &str, digest: &Digest) -> Asked<PeerBlob> {
        let response = match self.get(&peer, path).await {
            Ok(response) => response,
            Err(asked) => return asked.nothing(),
        };
        let address = peer.address().to_string();
        let Some(size) = crate::upstream::content_length(response.headers()) else {
            tracing::debug!(peer = %address, %digest, "the owner sent no length; asking upstream");
            self.sent(&peer, "declined");
            return Asked::Declined;
        };
        self.sent(&peer, "ok");
        Asked::Got(PeerBlob {
            bytes: response
                .into_body()
                .into_data_stream()
                .map_err(|e| e.to_string())
                .boxed(),
            size,
            peer,
            label: address,
        })
    }

    /// Counts what a peer sent.
    pub(crate) fn sent(&self, peer: &Peer, outcome: &str) {
        // A peer that left keeps no series (a request may outlive its membership).
        peer.while_member(|| self.metrics.peer_request_sent(peer.address(), outcome));
    }

    fn set_up(&self, peer: &Peer, up: bool) {
        peer.while_member(|| {
            let gauge = self.metrics.peer_up.with_label_values(&[peer.address()]);
            gauge.set(i64::from(up));
        });
    }

    /// `peer` could not be reached, or its body broke: it is skipped for `recheck_after`.
    pub fn failed(&self, peer: &Peer, error: &str) {
        self.sent(peer, "failed");
        self.mark_down(peer, error);
    }

    fn mark_down(&self, peer: &Peer, why: &str) {
        let address = peer.address();
        if peer.down_until(Instant::now() + self.config.recheck_after) {
            tracing::warn!(peer = %address, %why, recheck_after = ?self.config.recheck_after, "skipping a peer");
        }
        self.set_up(peer, false);
    }

    /// What `peer` sent did not verify: it is skipped as if it had not answered.
    pub fn sent_corrupt(&self, peer: &Peer, digest: &Digest, error: &str) {
        let address = peer.address();
        tracing::error!(peer = %address, %digest, %error, "a peer sent a blob that does not verify");
        self.sent(peer, "corrupt");
        self.mark_down(peer, "it sent a blob that does not verify");
    }

    /// Counts a request from a peer.
    pub fn served(&self, outcome: &str) {
        self.metrics.peer_request_served(outcome);
    }
}

/// The path of a peer request for `what` (`<repo>/blobs/<digest>`) of `registry`.
fn peer_path(registry: &str, what: &str) -> String {
    format!("/v2/{what}?ns={}", registry.replace(':', "%3A"))
}

/// A random name for this process.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        bytes = (std::process::id() as u64 ^ now_nanos()).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A peer's rendezvous score for `key`: the first 8 bytes of sha256(address, key).
fn rendezvous_score(address: &str, key: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(address.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(own: &str, peers: &[&str]) -> Cluster {
        let config: ClusterConfig = toml::from_str(&format!(
            "self = {own:?}\npeers = {peers:?}\nsecret = \"a-cluster-secret-of-some-length\""
        ))
        .unwrap();
        Cluster::new(&config, 4, Arc::new(Metrics::new(&[]))).unwrap()
    }

    #[test]
    fn every_replica_agrees_on_owners_and_a_lost_peer_moves_only_its_own_keys() {
        let peers = [
            "http://10.0.0.11:5000",
            "http://10.0.0.12:5000",
            "http://10.0.0.13:5000",
        ];
        let replicas: Vec<Cluster> = peers.iter().map(|own| cluster(own, &peers)).collect();
        let keys: Vec<String> = (0..3000).map(|i| format!("sha256:{i:064x}")).collect();
        let mut owned = [0usize; 3];
        for key in &keys {
            let order = replicas[0].members().owners(key);
            for replica in &replicas[1..] {
                assert_eq!(
                    replica.members().owners(key),
                    order,
                    "replicas disagree on {key}"
                );
            }
            owned[order[0]] += 1;
        }
        // Spread evenly: each owns about a third.
        assert!(owned.iter().all(|&n| (800..1200).contains(&n)), "{owned:?}");
        // Without the third peer, keys it did not own keep their owner.
        let two = cluster(peers[0], &peers[..2]);
        for key in &keys {
            let order = replicas[0].members().owners(key);
            if order[0] != 2 {
                assert_eq!(two.members().owners(key)[0], order[0]);
            }
        }
    }
}
