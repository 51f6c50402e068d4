//! A real S3-compatible server on loopback for the shared store's tests: `s3s-fs` (installed
//! by `tests/install_s3_server.sh`), serving a directory where each bucket is a folder and each
//! object a file, so a test can look at (and damage) what the bucket holds.

use super::e2e::{free_port, Process};
use regmirror::config::{Secret, SharedStoreConfig};
use regmirror::digest::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const BUCKET: &str = "regmirror";
pub const PREFIX: &str = "fleet";
const ACCESS_KEY: &str = "regmirror-test";
const SECRET_KEY: &str = "regmirror-test-secret";

/// The server, its directory and its port (kept across a restart).
pub struct S3Server {
    pub process: Option<Process>,
    pub root: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// The `s3s-fs` binary: on PATH or where `cargo install` puts it.
fn binary() -> PathBuf {
    let installed = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.exists());
    installed.unwrap_or_else(|| PathBuf::from("s3s-fs"))
}

impl S3Server {
    pub async fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut server = S3Server {
            process: None,
            root,
            port: free_port(),
            _dir: dir,
        };
        server.resume().await;
        server
    }

    /// Starts the server (again) on its port and directory, and waits until it answers.
    pub async fn resume(&mut self) {
        let log = self.root.parent().unwrap().join("s3s-fs.log");
        let process = Process::spawn(
            "s3s-fs",
            std::process::Command::new(binary())
                .args(["--host", "127.0.0.1", "--port"])
                .arg(self.port.to_string())
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&self.root),
            log,
        );
        self.process = Some(process);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "s3s-fs did not start: {}",
            self.process.as_ref().unwrap().output()
        );
    }

    /// Stops the server (SIGKILL, as a crash or a network partition looks).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[shared_store]` of a mirror using this server.
    pub fn config(&self) -> SharedStoreConfig {
        let text = format!(
            "url = \"s3://{BUCKET}/{PREFIX}\"\nendpoint = \"{}\"\nallow_http = true\n\
             region = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"",
            self.endpoint()
        );
        let mut config: SharedStoreConfig = toml::from_str(&text).unwrap();
        config.secret_access_key = Some(Secret::new(SECRET_KEY.to_string()));
        config.recheck_after = Duration::from_secs(1);
        config
    }

    /// The `[shared_store]` section of a mirror process's configuration file using this
    /// server.
    pub fn config_section(&self) -> String {
        format!(
            "[shared_store]\nurl = \"s3://{BUCKET}/{PREFIX}\"\nendpoint = \"{}\"\n\
             region = \"us-east-1\"\nallow_http = true\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key = \"{SECRET_KEY}\"\nrecheck_after = \"1s\"\n",
            self.endpoint()
        )
    }

    /// Where the bucket keeps a blob.
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.root
            .join(BUCKET)
            .join(PREFIX)
            .join("blobs/sha256")
            .join(digest.hex())
    }

    /// The blob's bytes as the bucket holds them, if it does.
    pub fn blob(&self, digest: &Digest) -> Option<Vec<u8>> {
        std::fs::read(self.blob_file(digest)).ok()
    }

    /// Files of multipart uploads not completed nor aborted (s3s-fs keeps them at its root,
    /// beside the buckets).
    pub fn unfinished_uploads(&self) -> Vec<String> {
        let mut found = Vec::new();
        walk(&self.root, &self.root, &mut found);
        found.retain(|f| f.contains(".upload"));
        found
    }

    /// Every object the bucket holds under the prefix (paths relative to it), sorted.
    pub fn objects(&self) -> Vec<String> {
        let base = self.root.join(BUCKET).join(PREFIX);
        let mut found = Vec::new();
        walk(&base, &base, &mut found);
        found.sort();
        found
    }
}

fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(base, &path, found);
        } else {
            found.push(path.strip_prefix(base).unwrap().display().to_string());
        }
    }
}
