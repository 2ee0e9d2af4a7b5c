//! A TCP proxy on loopback that counts the bytes crossing it, for measuring what sync
//! puts on the wire (everything: TCP payload of noise, yamux and the sync frames).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Byte counts and activity times of a [`CountingProxy`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from the dialing side to the upstream.
    pub up: AtomicU64,
    /// Bytes from the upstream to the dialing side.
    pub down: AtomicU64,
    /// Microseconds since the proxy started, of the last byte moved.
    pub last_activity_us: AtomicU64,
    /// Microseconds since the proxy started, of the last connection accepted.
    pub last_accept_us: AtomicU64,
}

/// Forwards every connection it accepts to `upstream`, counting bytes.
pub struct CountingProxy {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// The counts.
    pub counters: Arc<Counters>,
    started: Instant,
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
}

impl CountingProxy {
    /// Starts a proxy on 127.0.0.1 toward `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let started = Instant::now();
        let tasks: Arc<tokio::sync::Mutex<JoinSet<()>>> = Default::default();
        let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, t, b) = (counters.clone(), tasks.clone(), blocked.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if b.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                c.last_accept_us
                    .store(started.elapsed().as_micros() as u64, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut tasks = t.lock().await;
                tasks.spawn(pump(cr, sw, c.clone(), started, true));
                tasks.spawn(pump(sr, cw, c.clone(), started, false));
            }
        });
        Ok(Self {
            addr,
            counters,
            started,
            tasks,
            accept,
            blocked,
        })
    }

    /// Cuts every connection and refuses new ones (the two sides are apart) until
    /// [`CountingProxy::unblock`].
    pub async fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.cut().await;
    }

    /// Lets connections through again.
    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }

    /// Bytes moved so far, both ways.
    pub fn total(&self) -> u64 {
        self.counters.up.load(Ordering::SeqCst) + self.counters.down.load(Ordering::SeqCst)
    }

    /// Bytes moved so far: (from the dialing side, to it).
    pub fn directions(&self) -> (u64, u64) {
        (
            self.counters.up.load(Ordering::SeqCst),
            self.counters.down.load(Ordering::SeqCst),
        )
    }

    /// Closes every open connection.
    pub async fn cut(&self) {
        self.tasks.lock().await.abort_all();
    }

    /// Time since the proxy started.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Waits until no byte moved for `quiet`; answers the time of the last byte (µs).
    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.counters.last_activity_us.load(Ordering::SeqCst);
            if self.now_us().saturating_sub(last) >= quiet.as_micros() as u64
                || Instant::now() > deadline
            {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counters: Arc<Counters>,
    started: Instant,
    up: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        let counter = if up { &counters.up } else { &counters.down };
        counter.fetch_add(n as u64, Ordering::SeqCst);
        counters
            .last_activity_us
            .store(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown().await;
}
