//! A TCP relay in front of a server on loopback that counts what the server sends and when it
//! last sent it: how a test sees how many times an origin sent a blob, with a real origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub port: u16,
    sent: Arc<AtomicU64>,
    last_sent: Arc<Mutex<Option<Instant>>>,
    /// Everything clients sent: their requests.
    asked: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays every connection to `127.0.0.1:<target>`.
    pub async fn start(target: u16) -> Relay {
        Relay::paced(target, None).await
    }

    /// As [`Relay::start`], sending what the server sends at `pace` bytes per second (per
    /// connection) if given: a slow origin.
    pub async fn paced(target: u16, pace: Option<u64>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sent, last_sent) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(None)));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (sent, last_sent, asked) = (
                Arc::clone(&sent),
                Arc::clone(&last_sent),
                Arc::clone(&asked),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = SocketAddr::from(([127, 0, 0, 1], target));
                    let (sent, last_sent, asked) = (
                        Arc::clone(&sent),
                        Arc::clone(&last_sent),
                        Arc::clone(&asked),
                    );
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let counts = Counts {
                            sent: &sent,
                            last_sent: &last_sent,
                            asked: &asked,
                        };
                        relay(client, server, pace, counts).await;
                    });
                }
            }
        });
        Relay {
            port,
            sent,
            last_sent,
            asked,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bytes the server sent, every connection together.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// How many requests clients sent that begin with `line` (`GET /v2/...`).
    pub fn requests(&self, line: &str) -> usize {
        let asked = self.asked.lock().unwrap();
        let text = String::from_utf8_lossy(&asked);
        text.matches(&format!("{line} HTTP/1.1\r\n")).count()
    }

    /// When the server last sent a byte.
    pub fn last_sent_at(&self) -> Option<Instant> {
        *self.last_sent.lock().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a relayed connection adds to.
struct Counts<'a> {
    sent: &'a AtomicU64,
    last_sent: &'a Mutex<Option<Instant>>,
    asked: &'a Mutex<Vec<u8>>,
}

async fn relay(client: TcpStream, server: TcpStream, pace: Option<u64>, counts: Counts<'_>) {
    let Counts {
        sent,
        last_sent,
        asked,
    } = counts;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(read) = client_read.read(&mut buffer).await {
            if read == 0 || server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
            asked.lock().unwrap().extend_from_slice(&buffer[..read]);
        }
        let _ = server_write.shutdown().await;
    };
    let downward = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let started = Instant::now();
        let mut relayed = 0u64;
        while let Ok(read) = server_read.read(&mut buffer).await {
            if let Some(pace) = pace {
                let due = std::time::Duration::from_secs_f64(relayed as f64 / pace as f64);
                tokio::time::sleep_until((started + due).into()).await;
            }
            relayed += read as u64;
            if read == 0 || client_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
            sent.fetch_add(read as u64, Ordering::AcqRel);
            *last_sent.lock().unwrap() = Some(Instant::now());
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, downward);
}
