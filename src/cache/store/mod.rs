//! The on-disk store: the only code that builds paths under the cache directory.
//!
//! ```text
//! <dir>/blobs/sha256/<2 hex>/<64 hex>         immutable content (manifests too), name = digest
//! <dir>/blobs/sha256/<2 hex>/<64 hex>.meta    manifests only: their media type (JSON)
//! <dir>/tags/<registry>/<repository>/_tags/<tag>   tag record (JSON): digest, media type, size
//! <dir>/tags/<registry>/<repository>/_links/<64 hex>   empty: upstream served this content for
//!                                             this repository (what access rules rely on)
//! <dir>/tmp/                                  downloads in progress; emptied at start-up
//! ```
//!
//! Content enters `blobs/` only by rename after fsync, so a crash leaves either the whole
//! verified file or nothing. Paths are built only from parsed [`Digest`]s, validated
//! repository names and tags, and configured registry names. All calls block: async callers
//! run them on the blocking pool.

use crate::digest::Digest;
use crate::oci::MAX_MANIFEST_BYTES;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod records;

/// The cache directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Makes temp file names unique within this process.
    tmp_counter: AtomicU64,
    /// The server's exclusive lock on the directory, held while it runs.
    _lock: Option<File>,
}

/// What is kept beside a manifest: how to label it when served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMeta {
    pub media_type: String,
}

/// The last known answer for a tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds when upstream last confirmed this mapping.
    pub checked_at: u64,
}

/// A download in progress under `tmp/`, deleted on drop unless committed.
#[derive(Debug)]
pub struct TempBlob {
    path: PathBuf,
    pub file: File,
    committed: bool,
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What a scan of the store finds for one digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub digest: Digest,
    pub size: u64,
    /// Unix seconds of the file's modification time (the last recorded use).
    pub modified: u64,
    /// Has a manifest sidecar.
    pub manifest: bool,
}

impl Store {
    /// Opens (creating) the cache directory for the server and empties `tmp/` of what a
    /// previous run left. Takes the directory's lock: one server per cache directory.
    pub fn open(root: &Path) -> io::Result<Store> {
        let mut store = Store::open_shared(root)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        // An operator command probing for a server holds the lock for a moment: retried.
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another regmirror server uses {}", root.display()),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
        store._lock = Some(lock);
        let tmp = root.join("tmp");
        fs::remove_dir_all(&tmp)?;
        fs::create_dir_all(&tmp)?;
        Ok(store)
    }

    /// Opens the cache directory without touching downloads in progress (for commands that
    /// run beside a server).
    pub fn open_shared(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root.join("blobs/sha256"))?;
        fs::create_dir_all(root.join("tags"))?;
        fs::create_dir_all(root.join("tmp"))?;
        Ok(Store {
            root: root.to_owned(),
            tmp_counter: AtomicU64::new(0),
            _lock: None,
        })
    }

    /// Every stored digest with its size and recency. Files whose names are not digests
    /// (strays) are skipped.
    pub fn scan(&self) -> io::Result<Vec<Found>> {
        let mut found = Vec::new();
        let base = self.root.join("blobs/sha256");
        for prefix in read_dir_names(&base)? {
            if !base.join(&prefix).is_dir() {
                continue;
            }
            for name in read_dir_names(&base.join(&prefix))? {
                if name.ends_with(".meta") {
                    continue;
                }
                let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                    continue;
                };
                let path = base.join(&prefix).join(&name);
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                let manifest = self.meta_path(&digest).exists();
                found.push(Found {
                    digest,
                    size: meta.len(),
                    modified,
                    manifest,
                });
            }
        }
        Ok(found)
    }

    /// Deletes stored content (and its sidecar). Readers that have it open keep reading.
    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        for path in [self.blob_path(digest), self.meta_path(digest)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves corrupt content aside into `quarantine/` for inspection.
    pub fn quarantine(&self, digest: &Digest) -> io::Result<PathBuf> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir)?;
        let dest = dir.join(digest.hex());
        fs::rename(self.blob_path(digest), &dest)?;
        let _ = fs::remove_file(self.meta_path(digest));
        Ok(dest)
    }

    /// Records a use in the file's modification time (recency survives restarts).
    pub fn touch(&self, digest: &Digest, unix_secs: u64) -> io::Result<()> {
        let file = File::options().write(true).open(self.blob_path(digest))?;
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs))
    }

    /// The path of stored content, for commands that hash it.
    pub fn content_path(&self, digest: &Digest) -> PathBuf {
        self.blob_path(digest)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(&hex[..2])
            .join(hex)
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        let mut path = self.blob_path(digest).into_os_string();
        path.push(".meta");
        PathBuf::from(path)
    }

    /// Opens a stored blob: its file and size, or `None` when absent.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some((file, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a download: a fresh file under `tmp/`.
    pub fn create_temp(&self, digest: &Digest) -> io::Result<TempBlob> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let path =
            self.root
                .join("tmp")
                .join(format!("{}-{}-{n}", digest.hex(), std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempBlob {
            path,
            file,
            committed: false,
        })
    }

    /// Makes a verified download part of the store: fsync, rename, fsync the directory.
    pub fn commit(&self, mut temp: TempBlob, digest: &Digest) -> io::Result<()> {
        temp.file.sync_data()?;
        let dest = self.blob_path(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(&temp.path, &dest)?;
        temp.committed = true;
        File::open(dir)?.sync_all()
    }

    /// Stores a small verified object (a manifest) with its media type.
    pub fn put_manifest(
        &self,
        digest: &Digest,
        bytes: &[u8],
        meta: &ManifestMeta,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        self.write_atomically(&self.meta_path(digest), &json)?;
        let mut temp = self.create_temp(digest)?;
        temp.file.write_all(bytes)?;
        self.commit(temp, digest)
    }

    /// A stored manifest's bytes and media type, or `None` when the store holds no manifest
    /// with this digest. Only content stored as a manifest counts (its sidecar records the
    /// media type it was verified with), and never more than [`MAX_MANIFEST_BYTES`] is read:
    /// a layer with the same digest is not a manifest, however it is asked for.
    pub fn get_manifest(&self, digest: &Digest) -> io::Result<Option<(Vec<u8>, ManifestMeta)>> {
        let meta = match fs::read(self.meta_path(digest)) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Ok(meta) = serde_json::from_slice::<ManifestMeta>(&meta) else {
            return Ok(None);
        };
        let file = match File::open(self.blob_path(digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let limit = MAX_MANIFEST_BYTES as u64;
        if file.metadata()?.len() > limit {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        file.take(limit).read_to_end(&mut bytes)?;
        Ok(Some((bytes, meta)))
    }

    /// Whether a server holds the directory (commands then leave `tmp/` alone).
    pub fn server_running(root: &Path) -> bool {
        let Ok(lock) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))
        else {
            return false;
        };
        match lock.try_lock() {
            Ok(()) => {
                let _ = lock.unlock();
                false
            }
            Err(_) => true,
        }
    }

    /// Whether a file can be created in the store (readiness).
    pub fn is_writable(&self) -> bool {
        let probe = self
            .root
            .join("tmp")
            .join(format!(".probe-{}", std::process::id()));
        let ok = File::create(&probe).is_ok();
        let _ = fs::remove_file(&probe);
        ok
    }

    fn write_atomically(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("small-{}-{n}", std::process::id()));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_data()?;
            fs::create_dir_all(dest.parent().expect("store paths have a parent"))?;
            fs::rename(&tmp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// The names in a directory; none when it does not exist.
fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_vanish_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        let mut t = store.create_temp(&d).unwrap();
        t.file.write_all(b"x").unwrap();
        drop(t);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(store.open_blob(&d).unwrap().is_none());
        let mut t = store.create_temp(&d).unwrap();
        t.file.write_all(b"x").unwrap();
        store.commit(t, &d).unwrap();
        assert_eq!(store.open_blob(&d).unwrap().unwrap().1, 1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn only_content_stored_as_a_manifest_within_the_limit_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let commit = |bytes: &[u8]| {
            let d = Digest::of(bytes);
            let mut t = store.create_temp(&d).unwrap();
            t.file.write_all(bytes).unwrap();
            store.commit(t, &d).unwrap();
            d
        };
        // A layer is not a manifest, whatever asks.
        let layer = commit(b"a layer's bytes");
        assert!(store.get_manifest(&layer).unwrap().is_none());
        // A manifest is, with the media type it was verified with.
        let meta = ManifestMeta {
            media_type: crate::oci::OCI_MANIFEST.into(),
        };
        let manifest = Digest::of(b"{}");
        store.put_manifest(&manifest, b"{}", &meta).unwrap();
        let (bytes, got) = store.get_manifest(&manifest).unwrap().unwrap();
        assert_eq!((&bytes[..], got), (&b"{}"[..], meta.clone()));
        // Content past the manifest limit is never read, even with a sidecar.
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let big_digest = commit(&big);
        let json = serde_json::to_vec(&meta).unwrap();
        fs::write(store.meta_path(&big_digest), json).unwrap();
        assert!(store.get_manifest(&big_digest).unwrap().is_none());
    }

    #[test]
    fn one_server_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        assert!(Store::server_running(dir.path()));
        let second = Store::open(dir.path()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
        drop(first);
        assert!(!Store::server_running(dir.path()));
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn restart_purges_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = store.create_temp(&Digest::of(b"y")).unwrap();
        std::mem::forget(t); // as if the process died mid-download
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        drop(store);
        Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn scan_finds_content_and_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = Digest::of(b"blob");
        let mut t = store.create_temp(&blob).unwrap();
        t.file.write_all(b"blob").unwrap();
        store.commit(t, &blob).unwrap();
        let manifest = Digest::of(b"{}");
        store
            .put_manifest(
                &manifest,
                b"{}",
                &ManifestMeta {
                    media_type: "a/b".into(),
                },
            )
            .unwrap();
        std::fs::write(dir.path().join("blobs/sha256/zz-stray"), b"x").ok();
        let mut found = store.scan().unwrap();
        found.sort_by_key(|f| f.size);
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].size, found[0].manifest), (2, true));
        assert_eq!((found[1].size, found[1].manifest), (4, false));
        store.touch(&blob, 1_000_000).unwrap();
        let touched = store
            .scan()
            .unwrap()
            .into_iter()
            .find(|f| f.digest == blob)
            .unwrap();
        assert_eq!(touched.modified, 1_000_000);
        store.remove_blob(&manifest).unwrap();
        assert_eq!(store.scan().unwrap().len(), 1);
    }
}
