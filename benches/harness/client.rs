//! A keep-alive HTTP/1.1 client that reads 1 MiB at a time, as pulling clients read (dockerd,
//! containerd and skopeo hand the body to a hash and a file in large reads), for the benches
//! that measure what those clients see. Written by hand: neither curl nor hyper's body frames
//! give 1 MiB reads and a first-byte time per download.

use super::{Blob, MIB};
use regmirror::digest::Hasher;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The `Accept` of pulling clients.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A keep-alive HTTP/1.1 connection read 1 MiB at a time, as pulling clients read.
pub struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// Bytes read past the last answer.
    pending: Vec<u8>,
}

/// One answer: when its first body byte came, and its body when it was not a blob.
pub struct Got {
    pub first_byte: Instant,
    pub body: Vec<u8>,
}

impl Connection {
    pub fn open(port: u16) -> Connection {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        Connection {
            stream,
            buffer: vec![0; MIB as usize],
            pending: Vec::new(),
        }
    }

    /// GETs `path`; a `blob` is hashed and checked against its digest and size, not kept.
    pub fn get(&mut self, path: &str, blob: Option<&Blob>) -> Got {
        let (mut hasher, mut body) = (Hasher::default(), Vec::new());
        let (first_byte, length) = self.get_with(path, |bytes| {
            if blob.is_some() {
                hasher.update(bytes);
            } else {
                body.extend_from_slice(bytes);
            }
        });
        if let Some(blob) = blob {
            assert_eq!(length, blob.size, "{path}: length");
            assert_eq!(
                hasher.finish(),
                blob.digest,
                "{path}: not the blob asked for"
            );
        }
        Got { first_byte, body }
    }

    /// GETs `path` and reads its body to the end without keeping it (what a client that
    /// writes layers to disk and hashes elsewhere costs on the wire): (first body byte, bytes).
    pub fn read_through(&mut self, path: &str) -> (Instant, u64) {
        self.get_with(path, |_| {})
    }

    /// GETs `path`, handing each piece of the body to `take` as it is read (1 MiB reads);
    /// returns when the first body byte came and the body's length.
    fn get_with(&mut self, path: &str, mut take: impl FnMut(&[u8])) -> (Instant, u64) {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {ACCEPT}\r\nUser-Agent: regmirror-bench\r\n\r\n"
        );
        self.stream.write_all(request.as_bytes()).unwrap();
        let mut head = std::mem::take(&mut self.pending);
        let end = loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = self.stream.read(&mut self.buffer).expect("read");
            assert!(n > 0, "{path}: the connection closed before the headers");
            head.extend_from_slice(&self.buffer[..n]);
        };
        let text = String::from_utf8_lossy(&head[..end]).to_string();
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{path}: {}",
            text.lines().next().unwrap_or("")
        );
        let length: u64 = text
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("{path}: no Content-Length"));
        let mut first_byte = None;
        let already = (head.len() - end).min(length as usize);
        if already > 0 {
            first_byte = Some(Instant::now());
            take(&head[end..end + already]);
        }
        self.pending = head[end + already..].to_vec();
        let mut read = already as u64;
        while read < length {
            let want = ((length - read) as usize).min(self.buffer.len());
            let n = self.stream.read(&mut self.buffer[..want]).expect("read");
            assert!(
                n > 0,
                "{path}: the connection closed after {read} of {length} bytes"
            );
            first_byte.get_or_insert_with(Instant::now);
            take(&self.buffer[..n]);
            read += n as u64;
        }
        (first_byte.unwrap_or_else(Instant::now), length)
    }
}
