//! Small blobs served lately, kept open and loaded: a hit on one (a config, a small layer)
//! answers from memory, with no trip to the blocking pool, no `open` and no mapping.
//!
//! Only blobs whose bytes fit in one window (see [`crate::body::read_first`]) are kept, at
//! most [`HOT_BYTES`] of them and at most [`HOT_FILES`] open files (a blob counts as at least
//! [`HOT_BYTES`] / [`HOT_FILES`] bytes), each for [`HOT_IDLE`] after its last use: the server
//! calls [`HotBlobs::let_go_of_idle`] every few seconds, so a quiet server closes them too. Their bytes are the
//! mapped (or, where mapping failed, copied) window read when the blob was last opened: the
//! page cache's pages, not a copy, and sent by `sendfile` on plain connections like any window.
//! A blob used within the last seconds has its pages in the page cache, so serving one never
//! waits on the disk.
//!
//! Entries follow the blob's life: eviction and `forget` drop them at once (so the disk space is
//! freed), and one whose file was removed behind the server's back (`regmirror gc` in another
//! process) is seen by its link count and dropped at its next use.

use crate::digest::Digest;
use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of blobs kept (page cache pages, mapped; anonymous memory only where copied).
pub const HOT_BYTES: u64 = 32 * 1024 * 1024;
/// Open files kept at most: a crowd of tiny blobs (configs of a few hundred bytes) would
/// otherwise fill [`HOT_BYTES`] with tens of thousands of descriptors.
pub const HOT_FILES: u64 = 512;
/// A blob unused for this long is let go.
pub const HOT_IDLE: Duration = Duration::from_secs(30);
/// How often the server lets go of blobs idle for [`HOT_IDLE`].
pub const HOT_SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One kept blob: the open file (which keeps the inode, and so the mapping, valid) and its
/// whole content.
#[derive(Clone)]
pub struct HotBlob {
    pub file: Arc<File>,
    pub bytes: Bytes,
}

/// The kept blobs, by digest.
pub struct HotBlobs {
    entries: moka::sync::Cache<Digest, HotBlob>,
}

impl Default for HotBlobs {
    fn default() -> HotBlobs {
        HotBlobs::idle_after(HOT_IDLE)
    }
}

impl HotBlobs {
    fn idle_after(idle: Duration) -> HotBlobs {
        let least = HOT_BYTES / HOT_FILES;
        HotBlobs {
            entries: moka::sync::Cache::builder()
                .max_capacity(HOT_BYTES)
                .weigher(move |_, blob: &HotBlob| {
                    u32::try_from((blob.bytes.len() as u64).max(least)).unwrap_or(u32::MAX)
                })
                .time_to_idle(idle)
                .build(),
        }
    }

    /// Closes the files of blobs unused for [`HOT_IDLE`] (the cache only does its bookkeeping
    /// when it is used: without this, a server gone quiet would hold them for ever).
    pub fn let_go_of_idle(&self) {
        // The first run removes the expired entries; their values (the open files) are dropped
        // by the next one, which applies the removals it queued.
        self.entries.run_pending_tasks();
        self.entries.run_pending_tasks();
    }

    /// The blob, if kept and its file still stored.
    pub fn get(&self, digest: &Digest) -> Option<HotBlob> {
        let blob = self.entries.get(digest)?;
        // `fstat` of an open file: the inode is in memory, no disk is touched.
        let stored = blob.file.metadata().is_ok_and(|m| m.nlink() > 0);
        if !stored {
            self.forget(digest);
            return None;
        }
        Some(blob)
    }

    /// Keeps a blob just opened, when its whole content is in `bytes`.
    pub fn remember(&self, digest: &Digest, file: &Arc<File>, size: u64, bytes: &Bytes) {
        if size == 0 || bytes.len() as u64 != size || size > HOT_BYTES / 8 {
            return;
        }
        let blob = HotBlob {
            file: Arc::clone(file),
            bytes: bytes.clone(),
        };
        self.entries.insert(digest.clone(), blob);
    }

    /// Lets a blob go (evicted or removed): its file is no longer held open here.
    pub fn forget(&self, digest: &Digest) {
        self.entries.invalidate(digest);
        // The cache's pending bookkeeping still refers to the entry (and so holds the file open)
        // until it is run.
        self.entries.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stored_file(dir: &std::path::Path, content: &[u8]) -> (std::path::PathBuf, Arc<File>) {
        let path = dir.join(Digest::of(content).hex());
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        (path.clone(), Arc::new(File::open(&path).unwrap()))
    }

    #[test]
    fn keeps_whole_small_blobs_until_forgotten_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let hot = HotBlobs::default();
        let (a, b) = (b"config".as_slice(), b"layer".as_slice());
        let (_, file_a) = stored_file(dir.path(), a);
        let (path_b, file_b) = stored_file(dir.path(), b);
        let (da, db) = (Digest::of(a), Digest::of(b));
        hot.remember(&da, &file_a, 6, &Bytes::from_static(b"config"));
        hot.remember(&db, &file_b, 5, &Bytes::from_static(b"layer"));
        assert_eq!(hot.get(&da).unwrap().bytes, a);
        assert_eq!(hot.get(&db).unwrap().bytes, b);

        hot.forget(&da);
        assert!(hot.get(&da).is_none(), "forgotten on eviction");
        std::fs::remove_file(path_b).unwrap();
        assert!(hot.get(&db).is_none(), "its file was removed");
    }

    #[test]
    fn lets_go_of_idle_blobs_on_a_quiet_server_and_holds_few_files() {
        let dir = tempfile::tempdir().unwrap();
        let hot = HotBlobs::idle_after(Duration::from_millis(50));
        let (_, file) = stored_file(dir.path(), b"config");
        let digest = Digest::of(b"config");
        hot.remember(&digest, &file, 6, &Bytes::from_static(b"config"));
        hot.let_go_of_idle();
        assert_eq!(Arc::strong_count(&file), 2, "kept while in use");
        std::thread::sleep(Duration::from_millis(120));
        // Nothing touches the cache: only the sweep closes the file.
        hot.let_go_of_idle();
        assert_eq!(
            Arc::strong_count(&file),
            1,
            "the idle blob's file is let go"
        );

        // Three times as many tiny blobs as open files allowed: the ceiling holds.
        let hot = HotBlobs::default();
        let files: Vec<_> = (0..HOT_FILES * 3)
            .map(|i| {
                let content = format!("blob {i}");
                let (_, file) = stored_file(dir.path(), content.as_bytes());
                let digest = Digest::of(content.as_bytes());
                let bytes = Bytes::from(content.into_bytes());
                hot.remember(&digest, &file, bytes.len() as u64, &bytes);
                file
            })
            .collect();
        hot.let_go_of_idle();
        let held = files.iter().filter(|f| Arc::strong_count(f) > 1).count() as u64;
        assert!(held <= HOT_FILES, "{held} files held open");
        assert!(
            held >= HOT_FILES / 2,
            "only {held} kept: the cache stopped keeping"
        );
    }

    #[test]
    fn keeps_only_blobs_held_whole() {
        let dir = tempfile::tempdir().unwrap();
        let hot = HotBlobs::default();
        let (_, file) = stored_file(dir.path(), b"0123456789");
        let digest = Digest::of(b"0123456789");
        hot.remember(&digest, &file, 10, &Bytes::from_static(b"01234"));
        assert!(hot.get(&digest).is_none(), "only the first part was read");
        hot.remember(&digest, &file, 0, &Bytes::new());
        assert!(hot.get(&digest).is_none(), "empty blobs need no keeping");
    }
}
