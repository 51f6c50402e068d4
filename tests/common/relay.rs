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
        let task = tokio::spawn({
            let (sent, last_sent) = (Arc::clone(&sent), Arc::clone(&last_sent));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = SocketAddr::from(([127, 0, 0, 1], target));
                    let (sent, last_sent) = (Arc::clone(&sent), Arc::clone(&last_sent));
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        relay(client, server, pace, &sent, &last_sent).await;
                    });
                }
            }
        });
        Relay {
            port,
            sent,
            last_sent,
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

async fn relay(
    client: TcpStream,
    server: TcpStream,
    pace: Option<u64>,
    sent: &AtomicU64,
    last_sent: &Mutex<Option<Instant>>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
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
