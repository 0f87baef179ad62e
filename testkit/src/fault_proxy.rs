//! A TCP forwarder that a test puts between a client and a broker to inject
//! network faults: cut every connection, stall the traffic, refuse new
//! connections.
//!
//! Reconnection logic is only tested when connections really break. A broker
//! restart does that, but not every broker keeps its data across a restart
//! (the Pub/Sub emulator is in memory) and a restart is slow. A
//! [`FaultProxy`] breaks the connections of just the client under test, in
//! front of any broker, in a few microseconds:
//!
//! - [`FaultProxy::cut`] closes every current connection (both sides see the
//!   connection closed); new connections are accepted as before, so a client
//!   that reconnects gets through.
//! - [`FaultProxy::stall`] stops forwarding bytes in both directions without
//!   closing anything (a hung network or a frozen broker); connections made
//!   while stalled are accepted but stall too. [`FaultProxy::resume`]
//!   forwards again, losing nothing.
//! - [`FaultProxy::refuse_new`] makes the proxy close new connections right
//!   after accepting them (a broker that is down), until turned off.
//!
//! The proxy listens on `127.0.0.1` on a port of its own
//! ([`FaultProxy::addr`]); point the client there instead of at the broker.
//! It runs on the tokio runtime it was started on and stops (closing its
//! listener and every connection) when dropped or on
//! [`FaultProxy::shutdown`].
//!
//! One caveat: a connection exists for the proxy once it has *accepted* it.
//! The kernel completes a TCP handshake before that, so a client may believe
//! it is connected a moment before the proxy counts the connection. A test
//! that wants to cut a connection should first see it work (e.g. a round
//! trip through the broker), or wait for [`FaultProxy::connections`] to grow.
//!
//! ```
//! use tidemill_testkit::fault_proxy::FaultProxy;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // A stand-in for a broker: echoes one message back.
//! let upstream = TcpListener::bind("127.0.0.1:0").await?;
//! let upstream_addr = upstream.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = upstream.accept().await {
//!         tokio::spawn(async move {
//!             let mut buf = [0u8; 5];
//!             if s.read_exact(&mut buf).await.is_ok() {
//!                 let _ = s.write_all(&buf).await;
//!             }
//!         });
//!     }
//! });
//!
//! let proxy = FaultProxy::start(upstream_addr).await?;
//! let mut client = TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"hello").await?;
//! let mut reply = [0u8; 5];
//! client.read_exact(&mut reply).await?;
//! assert_eq!(&reply, b"hello");
//!
//! // The network fails: the client's connection is closed...
//! proxy.cut();
//! let mut rest = Vec::new();
//! client.read_to_end(&mut rest).await?; // returns at EOF
//!
//! // ...and a new one works again.
//! let mut client = TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"again").await?;
//! client.read_exact(&mut reply).await?;
//! assert_eq!(&reply, b"again");
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Size of the buffer each direction of a connection forwards through.
const BUF_SIZE: usize = 16 * 1024;

/// What the proxy's tasks obey; one watch channel carries it to all of them.
#[derive(Clone, Copy, Debug, Default)]
struct Control {
    /// Forwarding is paused.
    stalled: bool,
    /// Incremented by every [`FaultProxy::cut`]; a connection accepted under
    /// an older generation is closed.
    generation: u64,
    /// The proxy is going away: everything stops.
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    control: watch::Sender<Control>,
    refuse_new: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicUsize,
}

/// A TCP forwarder on `127.0.0.1` in front of one upstream address, with
/// switches to cut, stall and refuse connections. See the
/// [module documentation](self) for what each fault does.
///
/// Dropping the proxy stops it: the listener and every forwarded connection
/// are closed (asynchronously, by the proxy's tasks, within moments).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl FaultProxy {
    /// Starts a proxy that listens on `127.0.0.1` on a free port and forwards
    /// every connection it accepts to `upstream`.
    ///
    /// `upstream` is resolved once, here (its first address is used). The
    /// upstream does not have to accept connections yet: each connection to
    /// the proxy opens its own connection upstream, and is closed if that
    /// fails.
    ///
    /// Must be called within a tokio runtime, which runs the proxy.
    ///
    /// # Errors
    ///
    /// Fails if `upstream` does not resolve to any address or the listening
    /// socket cannot be bound.
    pub async fn start(upstream: impl ToSocketAddrs) -> io::Result<FaultProxy> {
        let upstream = tokio::net::lookup_host(upstream)
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "fault proxy: upstream address resolved to nothing",
                )
            })?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (control, _) = watch::channel(Control::default());
        let shared = Arc::new(Shared {
            control,
            refuse_new: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&shared),
            tasks.clone(),
        ));
        Ok(FaultProxy {
            addr,
            upstream,
            shared,
            tasks,
        })
    }

    /// The address the proxy listens on (`127.0.0.1:<port>`): give this to
    /// the client instead of the broker's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every connection the proxy has accepted so far, on both sides
    /// (client and upstream). Connections made afterwards are forwarded as
    /// usual (and stall if the proxy is stalled).
    pub fn cut(&self) {
        self.shared.control.send_modify(|c| c.generation += 1);
    }

    /// Stops forwarding bytes, in both directions, on every connection,
    /// including ones made while stalled; nothing is closed. Bytes already
    /// read are held and forwarded on [`resume`](Self::resume); the rest waits
    /// in the kernel's buffers, so senders eventually block as on a hung
    /// network.
    pub fn stall(&self) {
        self.shared.control.send_modify(|c| c.stalled = true);
    }

    /// Forwards bytes again after [`stall`](Self::stall), nothing lost.
    pub fn resume(&self) {
        self.shared.control.send_modify(|c| c.stalled = false);
    }

    /// Whether the proxy is stalled.
    pub fn is_stalled(&self) -> bool {
        self.shared.control.borrow().stalled
    }

    /// While `true`, every new connection is closed right after the proxy
    /// accepts it, without connecting upstream: to a client it looks like a
    /// broker that is down. Current connections are not affected (combine
    /// with [`cut`](Self::cut) for that).
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse_new.store(refuse, Ordering::SeqCst);
    }

    /// How many connections the proxy has accepted and forwarded since it
    /// started (refused ones not included). Grows by one per connection, so a
    /// test can wait for a client to reconnect.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// How many connections were closed at once because of
    /// [`refuse_new`](Self::refuse_new).
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// How many forwarded connections are open right now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stops the proxy and waits until its listener and every connection are
    /// closed. (Dropping the proxy does the same without waiting.)
    pub async fn shutdown(self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
        self.tasks.close();
    }
}

/// Why a connection's forwarding ended.
enum End {
    /// The source closed its side; the other direction may go on.
    Eof,
    /// Cut, or proxy shut down: close the whole connection now.
    Stopped,
}

/// Resolves once the connection of `generation` must close (cut or
/// shutdown); never resolves otherwise.
async fn stopped(ctl: &mut watch::Receiver<Control>, generation: u64) {
    loop {
        {
            let c = ctl.borrow_and_update();
            if c.shutdown || c.generation != generation {
                return;
            }
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves once the proxy shuts down.
async fn shut_down(ctl: &mut watch::Receiver<Control>) {
    loop {
        if ctl.borrow_and_update().shutdown {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until bytes may flow. `Err(())`: the connection must close instead.
async fn flowing(ctl: &mut watch::Receiver<Control>, generation: u64) -> Result<(), ()> {
    loop {
        {
            let c = ctl.borrow_and_update();
            if c.shutdown || c.generation != generation {
                return Err(());
            }
            if !c.stalled {
                return Ok(());
            }
        }
        if ctl.changed().await.is_err() {
            return Err(());
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    tasks: TaskTracker,
) {
    let mut ctl = shared.control.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shut_down(&mut ctl) => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::debug!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        if shared.refuse_new.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        // The connection belongs to the generation current when accepted.
        let generation = shared.control.borrow().generation;
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(Arc::clone(&shared));
        let ctl = shared.control.subscribe();
        tasks.spawn(async move {
            let _guard = guard;
            forward(client, upstream, ctl, generation).await;
        });
    }
}

/// Decrements the active-connection count when a connection task ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    mut ctl: watch::Receiver<Control>,
    generation: u64,
) {
    let server = tokio::select! {
        r = TcpStream::connect(upstream) => match r {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "fault proxy: upstream connect failed");
                return;
            }
        },
        () = stopped(&mut ctl, generation) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, ctl.clone(), generation);
    let down = pump(server_read, client_write, ctl, generation);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            e = &mut up, if !up_done => { up_done = true; e }
            e = &mut down, if !down_done => { down_done = true; e }
        };
        if !matches!(end, Ok(End::Eof)) {
            // Cut, shutdown, or an I/O error on either side: close both.
            return;
        }
    }
}

/// Copies `from` to `to` until EOF, obeying stall/cut/shutdown.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut ctl: watch::Receiver<Control>,
    generation: u64,
) -> io::Result<End> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        if flowing(&mut ctl, generation).await.is_err() {
            return Ok(End::Stopped);
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            () = stopped(&mut ctl, generation) => return Ok(End::Stopped),
        };
        if n == 0 {
            // Pass the half-close on; the other direction carries on.
            let _ = to.shutdown().await;
            return Ok(End::Eof);
        }
        // A stall may have begun while we were reading: hold the bytes.
        if flowing(&mut ctl, generation).await.is_err() {
            return Ok(End::Stopped);
        }
        tokio::select! {
            r = to.write_all(&buf[..n]) => r?,
            () = stopped(&mut ctl, generation) => return Ok(End::Stopped),
        }
    }
}
