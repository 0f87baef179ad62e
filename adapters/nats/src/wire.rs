//! A NATS protocol connection that keeps received messages as bytes.
//!
//! async-nats parses every received header block into `String`s on its connection task:
//! a header value that is not UTF-8 (or a bare CR in a value, or a header line it cannot
//! split) fails the whole connection, which then reconnects and meets the same message
//! again; it also trims values and forgets the order of header names. Tidemill receives
//! messages on this connection instead: it hands each `MSG`/`HMSG` over with its header
//! block untouched (see [`crate::codec`] for how it is read), and publishes the messages
//! async-nats cannot express (raw header bytes) with `HPUB`. JetStream management
//! (streams, consumers) stays on async-nats.
//!
//! The connection speaks the client protocol (`CONNECT`, `PING`/`PONG`, `SUB`/`UNSUB`,
//! `PUB`/`HPUB`), authenticates like async-nats (user and password, token, credentials
//! file, from the configuration or the URL), upgrades to TLS when the URL, the
//! configuration or the server asks for it, and reconnects by itself, re-subscribing every
//! subscription; each reconnect bumps a counter its users watch (pull requests made
//! before are gone with the old connection).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::ServerAddr;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::NatsConfig;
use crate::BROKER;

/// A received message, bytes as the server sent them.
#[derive(Clone, Debug)]
pub(crate) struct WireMsg {
    pub subject: Bytes,
    pub reply: Option<Bytes>,
    /// The header block (`NATS/1.0 ...` line, header lines, empty line), when present.
    pub headers: Option<Bytes>,
    pub payload: Bytes,
}

impl WireMsg {
    /// The reply subject as text (subjects are ASCII in practice; a reply subject that is
    /// not UTF-8 cannot be acked through the text APIs and counts as absent).
    pub(crate) fn reply_str(&self) -> Option<&str> {
        self.reply
            .as_deref()
            .and_then(|r| std::str::from_utf8(r).ok())
    }

    /// The status code of the header block's first line (`NATS/1.0 408 ...`), if any.
    pub(crate) fn status(&self) -> Option<u16> {
        let block = self.headers.as_deref()?;
        let line_end = block
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(block.len());
        let line = block[..line_end].strip_prefix(b"NATS/1.0")?;
        let code = line.trim_ascii_start().split(|b| *b == b' ').next()?;
        std::str::from_utf8(code).ok()?.parse().ok()
    }

    /// The status line's description (`Consumer Deleted`), if any.
    pub(crate) fn description(&self) -> Option<&str> {
        let block = self.headers.as_deref()?;
        let line_end = block.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(block[..line_end].strip_prefix(b"NATS/1.0")?).ok()?;
        let rest = line.trim_start();
        let (_, description) = rest.split_once(' ')?;
        let description = description.trim();
        (!description.is_empty()).then_some(description)
    }
}

/// What a subscription has received and not handed out yet. Shared between the
/// connection (which appends) and the subscription (which takes), so whoever ends a
/// subscription can take what it holds without polling it.
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<WireMsg>>,
    waker: AtomicWaker,
    ended: AtomicBool,
    /// Messages beyond this are dropped (core NATS subscriptions: at most once).
    limit: usize,
    dropped: AtomicU64,
}

impl Inbox {
    fn new(limit: usize) -> Self {
        Inbox {
            queue: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            ended: AtomicBool::new(false),
            limit,
            dropped: AtomicU64::new(0),
        }
    }

    fn push(&self, msg: WireMsg) {
        {
            let mut queue = self.queue.lock();
            if queue.len() >= self.limit {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        broker = BROKER,
                        dropped = n + 1,
                        limit = self.limit,
                        "slow subscription: messages dropped"
                    );
                }
                return;
            }
            queue.push_back(msg);
        }
        self.waker.wake();
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The next message; `None` once the subscription ended and nothing is left.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<WireMsg>> {
        if let Some(msg) = self.queue.lock().pop_front() {
            return Poll::Ready(Some(msg));
        }
        self.waker.register(cx.waker());
        if let Some(msg) = self.queue.lock().pop_front() {
            return Poll::Ready(Some(msg));
        }
        if self.ended.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Everything received and not handed out.
    pub(crate) fn take_all(&self) -> Vec<WireMsg> {
        self.queue.lock().drain(..).collect()
    }
}

/// One subscription on a [`Wire`]: unsubscribed when dropped.
pub(crate) struct WireSub {
    wire: Wire,
    sid: u64,
    inbox: Arc<Inbox>,
    done: bool,
}

impl WireSub {
    pub(crate) fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// Unsubscribes and waits (at most `limit`) until the server handled the
    /// unsubscription: every message it sent before is then in the inbox. Returns what
    /// the inbox holds.
    pub(crate) async fn drain(mut self, limit: Duration) -> Vec<WireMsg> {
        self.done = true;
        let _ = self.wire.inner.cmds.send(Cmd::Unsub { sid: self.sid });
        let _ = tokio::time::timeout(limit, self.wire.flush()).await;
        self.wire.inner.subs.lock().remove(&self.sid);
        self.inbox.end();
        self.inbox.take_all()
    }
}

impl Drop for WireSub {
    fn drop(&mut self) {
        if !self.done {
            self.wire.inner.subs.lock().remove(&self.sid);
            let _ = self.wire.inner.cmds.send(Cmd::Unsub { sid: self.sid });
            self.inbox.end();
        }
    }
}

struct SubEntry {
    subject: String,
    queue: Option<String>,
    inbox: Arc<Inbox>,
}

enum Cmd {
    Sub {
        sid: u64,
        subject: String,
        queue: Option<String>,
    },
    Unsub {
        sid: u64,
    },
    Pub {
        subject: Bytes,
        reply: Option<Bytes>,
        headers: Option<Bytes>,
        payload: Bytes,
    },
    Ping(oneshot::Sender<()>),
    Close,
}

/// A protocol connection (see the module docs). Cheap to clone; the connection closes
/// when the last clone is dropped or [`close`](Wire::close) is called.
#[derive(Clone)]
pub(crate) struct Wire {
    inner: Arc<WireInner>,
    _owner: Arc<Owner>,
}

/// Closes the connection when the last handle goes.
struct Owner {
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Close);
    }
}

struct WireInner {
    cmds: mpsc::UnboundedSender<Cmd>,
    subs: Mutex<HashMap<u64, SubEntry>>,
    next_sid: AtomicU64,
    max_payload: AtomicUsize,
    connects: watch::Sender<u64>,
    /// A session is running (connected).
    up: AtomicBool,
    closed: AtomicBool,
    /// Replies to [`Wire::request`], by the last token of their subject.
    replies: Mutex<HashMap<String, oneshot::Sender<WireMsg>>>,
    reply_prefix: Mutex<Option<String>>,
}

/// How a connection authenticates.
#[derive(Clone, Default)]
struct Auth {
    user: Option<String>,
    pass: Option<String>,
    token: Option<String>,
    jwt: Option<String>,
    seed: Option<String>,
}

#[derive(Serialize)]
struct ConnectInfo<'a> {
    verbose: bool,
    pedantic: bool,
    lang: &'static str,
    version: &'static str,
    protocol: u8,
    headers: bool,
    no_responders: bool,
    echo: bool,
    tls_required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nkey: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What the connection task needs to (re)connect.
struct Dialer {
    servers: Vec<ServerAddr>,
    config: Arc<NatsConfig>,
    auth: Auth,
    /// Made on first need (the URL, the configuration or the server asks for TLS).
    tls: tokio::sync::OnceCell<Arc<async_nats::rustls::ClientConfig>>,
}

/// Longest control line accepted from the server.
const MAX_CONTROL_LINE: usize = 64 * 1024;
/// Messages a subscription holds at most before dropping (core NATS), like async-nats.
pub(crate) const SUBSCRIPTION_CAPACITY: usize = 65_536;

impl Wire {
    /// Connects as `config` says (trying each server once, each within `connect_timeout`),
    /// then keeps the
    /// connection up in the background.
    pub(crate) async fn connect(config: Arc<NatsConfig>) -> io::Result<Wire> {
        let servers = config
            .server_addrs()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut auth = Auth {
            user: config.user.clone(),
            pass: config.password.clone(),
            token: config.token.clone(),
            ..Auth::default()
        };
        if let Some(path) = &config.credentials_file {
            let contents = tokio::fs::read_to_string(path).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot read `credentials_file` {}: {}",
                        path.display(),
                        e.kind()
                    ),
                )
            })?;
            let (jwt, seed) = parse_creds(&contents).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "`credentials_file` {} holds no user JWT and nkey seed",
                        path.display()
                    ),
                )
            })?;
            auth.jwt = Some(jwt);
            auth.seed = Some(seed);
        }
        let dialer = Dialer {
            servers,
            config: config.clone(),
            auth,
            tls: tokio::sync::OnceCell::new(),
        };
        // Each server's attempt is bounded by `connect_timeout` (in `dial_any`).
        let (stream, info, rest) = dialer.dial_any().await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(WireInner {
            cmds: tx.clone(),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
            max_payload: AtomicUsize::new(info.max_payload),
            connects: watch::Sender::new(1),
            up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            replies: Mutex::new(HashMap::new()),
            reply_prefix: Mutex::new(None),
        });
        tokio::spawn(run(inner.clone(), dialer, rx, stream, rest));
        Ok(Wire {
            inner,
            _owner: Arc::new(Owner { cmds: tx }),
        })
    }

    /// Whether the connection is up (a session runs) and not closed.
    pub(crate) fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire) && !self.inner.closed.load(Ordering::Acquire)
    }

    /// A counter bumped on every connect (starting at 1).
    pub(crate) fn connects(&self) -> watch::Receiver<u64> {
        self.inner.connects.subscribe()
    }

    /// Subscribes to `subject` (in queue group `queue`); the server registered it once a
    /// later [`flush`](Wire::flush) returned.
    pub(crate) fn subscribe(&self, subject: &str, queue: Option<&str>, limit: usize) -> WireSub {
        let sid = self.inner.next_sid.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::new(limit));
        self.inner.subs.lock().insert(
            sid,
            SubEntry {
                subject: subject.to_owned(),
                queue: queue.map(str::to_owned),
                inbox: inbox.clone(),
            },
        );
        let _ = self.inner.cmds.send(Cmd::Sub {
            sid,
            subject: subject.to_owned(),
            queue: queue.map(str::to_owned),
        });
        if self.inner.closed.load(Ordering::Acquire) {
            inbox.end();
        }
        WireSub {
            wire: self.clone(),
            sid,
            inbox,
            done: false,
        }
    }

    /// Publishes (written in the order of the calls, on the current connection or the
    /// next one).
    pub(crate) fn publish(
        &self,
        subject: impl Into<Bytes>,
        reply: Option<Bytes>,
        headers: Option<Bytes>,
        payload: Bytes,
    ) -> io::Result<()> {
        self.inner
            .cmds
            .send(Cmd::Pub {
                subject: subject.into(),
                reply,
                headers,
                payload,
            })
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))
    }

    /// Returns once the server processed everything written before (a `PING` answered);
    /// fails when the connection drops first.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmds
            .send(Cmd::Ping(tx))
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "connection closed"))?;
        rx.await
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionReset, "connection lost"))
    }

    /// Publishes with a reply subject of this connection and waits for the reply (at most
    /// `timeout`).
    pub(crate) async fn request(
        &self,
        subject: Bytes,
        headers: Option<Bytes>,
        payload: Bytes,
        timeout: Duration,
    ) -> io::Result<WireMsg> {
        let prefix = {
            let mut prefix = self.inner.reply_prefix.lock();
            match &*prefix {
                Some(p) => p.clone(),
                None => {
                    let p = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
                    let sid = self.inner.next_sid.fetch_add(1, Ordering::Relaxed);
                    // The replies' subscription: routed to waiters by the reader.
                    self.inner.subs.lock().insert(
                        sid,
                        SubEntry {
                            subject: format!("{p}.*"),
                            queue: None,
                            inbox: Arc::new(Inbox::new(0)),
                        },
                    );
                    let _ = self.inner.cmds.send(Cmd::Sub {
                        sid,
                        subject: format!("{p}.*"),
                        queue: None,
                    });
                    *prefix = Some(p.clone());
                    p
                }
            }
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.inner.replies.lock().insert(token.clone(), tx);
        let reply = Bytes::from(format!("{prefix}.{token}"));
        let result = async {
            self.publish(subject, Some(reply), headers, payload)?;
            rx.await
                .map_err(|_| io::Error::new(io::ErrorKind::ConnectionReset, "connection closed"))
        };
        let out = tokio::time::timeout(timeout, result).await;
        self.inner.replies.lock().remove(&token);
        match out {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply within {timeout:?}"),
            )),
        }
    }

    /// Closes the connection (after writing what is queued); every subscription ends.
    pub(crate) fn close(&self) {
        let _ = self.inner.cmds.send(Cmd::Close);
    }
}

/// A [`Wire`] opened on first use (publishers need one only for messages async-nats
/// cannot express).
pub(crate) struct LazyWire {
    config: Arc<NatsConfig>,
    cell: tokio::sync::OnceCell<Wire>,
}

impl LazyWire {
    pub(crate) fn new(config: Arc<NatsConfig>) -> Self {
        LazyWire {
            config,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    pub(crate) async fn get(&self) -> io::Result<&Wire> {
        self.cell
            .get_or_try_init(|| Wire::connect(self.config.clone()))
            .await
    }

    /// Closes the connection if it was opened.
    pub(crate) async fn close(&self) {
        if let Some(wire) = self.cell.get() {
            let _ = wire.flush().await;
            wire.close();
        }
    }
}

fn parse_creds(contents: &str) -> Option<(String, String)> {
    let mut jwt = None;
    let mut seed = None;
    let mut lines = contents.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let wanted = if line.contains("BEGIN NATS USER JWT") {
            &mut jwt
        } else if line.contains("BEGIN USER NKEY SEED") {
            &mut seed
        } else {
            continue;
        };
        *wanted = lines.by_ref().find(|l| !l.is_empty()).map(str::to_owned);
    }
    Some((jwt?, seed?))
}

async fn tls_config(config: &NatsConfig) -> io::Result<async_nats::rustls::ClientConfig> {
    use async_nats::rustls::pki_types::pem::PemObject;
    use async_nats::rustls::pki_types::CertificateDer;
    use async_nats::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    match &config.root_certificates {
        Some(path) => {
            let path = path.clone();
            let certs = tokio::task::spawn_blocking(move || {
                CertificateDer::pem_file_iter(&path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("cannot load `root_certificates` {}: {e}", path.display()),
                        )
                    })
            })
            .await
            .map_err(io::Error::other)??;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("`root_certificates`: {e}"),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    Ok(ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Dialer {
    /// Tries every server once, in random order (as async-nats does: the delivery
    /// connections of many subscribers spread over a cluster's nodes instead of all going
    /// to the first one listed), each attempt bounded by `connect_timeout` (a server that
    /// accepts and then hangs, or a host that drops packets, costs one timeout, not every
    /// attempt); the last failure when none answered.
    async fn dial_any(&self) -> io::Result<(Box<dyn Io>, async_nats::ServerInfo, BytesMut)> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no server configured");
        let mut order: Vec<&ServerAddr> = self.servers.iter().collect();
        fastrand::shuffle(&mut order);
        let limit = self.config.connect_timeout;
        for server in order {
            let attempt = tokio::time::timeout(limit, self.dial(server))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {limit:?} (`connect_timeout`)"),
                    ))
                });
            match attempt {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    tracing::debug!(broker = BROKER, server = %redacted(server), error = %e, "connection attempt failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn dial(
        &self,
        server: &ServerAddr,
    ) -> io::Result<(Box<dyn Io>, async_nats::ServerInfo, BytesMut)> {
        let tcp = TcpStream::connect((server.host(), server.port())).await?;
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn Io> = Box::new(tcp);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let line = read_line(&mut stream, &mut buf).await?;
        let info: async_nats::ServerInfo = match line.strip_prefix(b"INFO ") {
            Some(json) => serde_json::from_slice(json)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server did not start with INFO",
                ))
            }
        };
        let tls_required = self.config.tls_required || server.tls_required();
        if tls_required || info.tls_required {
            let tls = self
                .tls
                .get_or_try_init(|| async { tls_config(&self.config).await.map(Arc::new) })
                .await?;
            let name =
                async_nats::rustls::pki_types::ServerName::try_from(server.host().to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            stream = Box::new(connector.connect(name, stream).await?);
        }
        let mut auth = self.auth.clone();
        match (server.username(), server.password()) {
            (Some(user), Some(pass)) => {
                auth.user = Some(user.to_owned());
                auth.pass = Some(pass.to_owned());
            }
            (Some(token), None) => auth.token = Some(token.to_owned()),
            _ => {}
        }
        let (nkey, sig) = match &auth.seed {
            Some(seed) => {
                let pair = nkeys::KeyPair::from_seed(seed).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "the nkey seed is not valid")
                })?;
                let signed = pair.sign(info.nonce.as_bytes()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "cannot sign the server's nonce")
                })?;
                let public = auth.jwt.is_none().then(|| pair.public_key());
                (public, Some(URL_SAFE_NO_PAD.encode(signed)))
            }
            None => (None, None),
        };
        let connect = ConnectInfo {
            verbose: false,
            pedantic: false,
            lang: "rust-tidemill",
            version: env!("CARGO_PKG_VERSION"),
            protocol: 1,
            headers: true,
            no_responders: true,
            echo: true,
            tls_required,
            name: self.config.connection_name.as_deref(),
            user: auth.user.as_deref(),
            pass: auth.pass.as_deref(),
            auth_token: auth.token.as_deref(),
            jwt: auth.jwt.as_deref(),
            nkey,
            sig,
        };
        let mut hello = b"CONNECT ".to_vec();
        serde_json::to_writer(&mut hello, &connect).map_err(io::Error::other)?;
        hello.extend_from_slice(b"\r\nPING\r\n");
        stream.write_all(&hello).await?;
        stream.flush().await?;
        loop {
            let line = read_line(&mut stream, &mut buf).await?;
            if line.starts_with(b"PONG") {
                break;
            }
            if let Some(err) = line.strip_prefix(b"-ERR ") {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    String::from_utf8_lossy(err).trim_matches('\'').to_owned(),
                ));
            }
            // +OK, INFO, PING before the PONG: nothing to do yet.
            if line.starts_with(b"PING") {
                stream.write_all(b"PONG\r\n").await?;
            }
        }
        Ok((stream, info, buf))
    }
}

/// A server address for logs, without credentials.
pub(crate) fn redacted(server: &ServerAddr) -> String {
    format!("{}://{}:{}", server.scheme(), server.host(), server.port())
}

async fn read_line(stream: &mut Box<dyn Io>, buf: &mut BytesMut) -> io::Result<Bytes> {
    loop {
        if let Some(end) = find_crlf(buf) {
            let line = buf.split_to(end + 2).freeze();
            return Ok(line.slice(..end));
        }
        if buf.len() > MAX_CONTROL_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control line too long",
            ));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(pos) = buf[from..].iter().position(|b| *b == b'\r') {
        let at = from + pos;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// What the reader found in the buffer.
enum Op {
    Msg { sid: u64, msg: WireMsg },
    Ping,
    Pong,
    Err(String),
    Info(Box<async_nats::ServerInfo>),
    Other,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Parses one operation from `buf`, or `None` when more bytes are needed.
fn parse_op(buf: &mut BytesMut) -> io::Result<Option<Op>> {
    let Some(end) = find_crlf(buf) else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(bad("control line too long"));
        }
        return Ok(None);
    };
    let line = &buf[..end];
    let (headers, args_at) = if line.starts_with(b"MSG ") {
        (false, 4)
    } else if line.starts_with(b"HMSG ") {
        (true, 5)
    } else {
        let op = if line.starts_with(b"PING") {
            Op::Ping
        } else if line.starts_with(b"PONG") {
            Op::Pong
        } else if let Some(err) = line.strip_prefix(b"-ERR") {
            Op::Err(
                String::from_utf8_lossy(err)
                    .trim()
                    .trim_matches('\'')
                    .to_owned(),
            )
        } else if let Some(json) = line.strip_prefix(b"INFO ") {
            match serde_json::from_slice(json) {
                Ok(info) => Op::Info(Box::new(info)),
                Err(_) => Op::Other,
            }
        } else {
            Op::Other
        };
        buf.advance(end + 2);
        return Ok(Some(op));
    };
    // The arguments as ranges of the line (at most five; no allocation per message).
    let mut args = [(0usize, 0usize); 5];
    let mut count = 0;
    let mut at = args_at;
    while at < end {
        if line[at] == b' ' || line[at] == b'\t' {
            at += 1;
            continue;
        }
        let start = at;
        while at < end && line[at] != b' ' && line[at] != b'\t' {
            at += 1;
        }
        if count == args.len() {
            return Err(bad("bad MSG arguments"));
        }
        args[count] = (start, at);
        count += 1;
    }
    let num = |(from, to): (usize, usize)| -> io::Result<usize> {
        std::str::from_utf8(&line[from..to])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad number in MSG"))
    };
    let (subject, sid, reply, header_len, total_len) = match (headers, count) {
        (false, 3) => (args[0], args[1], None, 0, num(args[2])?),
        (false, 4) => (args[0], args[1], Some(args[2]), 0, num(args[3])?),
        (true, 4) => (args[0], args[1], None, num(args[2])?, num(args[3])?),
        (true, 5) => (
            args[0],
            args[1],
            Some(args[2]),
            num(args[3])?,
            num(args[4])?,
        ),
        _ => return Err(bad("bad MSG arguments")),
    };
    if header_len > total_len {
        return Err(bad("header length over total length"));
    }
    let sid = num(sid)? as u64;
    if buf.len() < end + 2 + total_len + 2 {
        buf.reserve(end + 2 + total_len + 2 - buf.len());
        return Ok(None);
    }
    // Subject and reply are slices of the control line (shared with the read buffer, like
    // the body), not copies.
    let control = buf.split_to(end + 2).freeze();
    let subject = control.slice(subject.0..subject.1);
    let reply = reply.map(|(from, to)| control.slice(from..to));
    let mut body = buf.split_to(total_len).freeze();
    buf.advance(2);
    let headers = headers.then(|| body.split_to(header_len));
    Ok(Some(Op::Msg {
        sid,
        msg: WireMsg {
            subject,
            reply,
            headers,
            payload: body,
        },
    }))
}

fn encode_cmd(out: &mut BytesMut, cmd: &Cmd) {
    match cmd {
        Cmd::Sub {
            sid,
            subject,
            queue,
        } => {
            out.put_slice(b"SUB ");
            out.put_slice(subject.as_bytes());
            if let Some(q) = queue {
                out.put_u8(b' ');
                out.put_slice(q.as_bytes());
            }
            out.put_slice(format!(" {sid}\r\n").as_bytes());
        }
        Cmd::Unsub { sid } => out.put_slice(format!("UNSUB {sid}\r\n").as_bytes()),
        Cmd::Pub {
            subject,
            reply,
            headers,
            payload,
        } => {
            let mut num = itoa_buf();
            match headers {
                Some(h) => {
                    out.put_slice(b"HPUB ");
                    out.put_slice(subject);
                    if let Some(r) = reply {
                        out.put_u8(b' ');
                        out.put_slice(r);
                    }
                    out.put_u8(b' ');
                    out.put_slice(num.format(h.len()));
                    out.put_u8(b' ');
                    out.put_slice(num.format(h.len() + payload.len()));
                    out.put_slice(b"\r\n");
                    out.put_slice(h);
                }
                None => {
                    out.put_slice(b"PUB ");
                    out.put_slice(subject);
                    if let Some(r) = reply {
                        out.put_u8(b' ');
                        out.put_slice(r);
                    }
                    out.put_u8(b' ');
                    out.put_slice(num.format(payload.len()));
                    out.put_slice(b"\r\n");
                }
            }
            out.put_slice(payload);
            out.put_slice(b"\r\n");
        }
        Cmd::Ping(_) => out.put_slice(b"PING\r\n"),
        Cmd::Close => {}
    }
}

/// A small integer formatter without allocation.
struct Num([u8; 20]);

fn itoa_buf() -> Num {
    Num([0; 20])
}

impl Num {
    fn format(&mut self, mut n: usize) -> &[u8] {
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &self.0[i..]
    }
}

/// Outcome of one connected session.
enum SessionEnd {
    Closed,
    Lost(io::Error),
}

/// The connection task: runs sessions, reconnecting between them, until closed.
async fn run(
    inner: Arc<WireInner>,
    mut dialer: Dialer,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    first: Box<dyn Io>,
    rest: BytesMut,
) {
    let mut stream = Some((first, rest));
    let mut attempts: usize = 0;
    loop {
        let (io, buf) = match stream.take() {
            Some(s) => s,
            None => {
                if let Some(max) = dialer.config.max_reconnects {
                    if attempts >= max {
                        tracing::warn!(
                            broker = BROKER,
                            attempts,
                            "giving up reconnecting (`max_reconnects`)"
                        );
                        break;
                    }
                }
                attempts += 1;
                let pause = Duration::from_millis(50 * (1 << attempts.min(6) as u32))
                    .min(Duration::from_secs(2));
                tokio::time::sleep(if attempts == 1 { Duration::ZERO } else { pause }).await;
                // Each server's attempt is bounded by `connect_timeout` (in `dial_any`).
                match dialer.dial_any().await {
                    Ok((io, info, buf)) => {
                        inner.max_payload.store(info.max_payload, Ordering::Relaxed);
                        learn_servers(&mut dialer, &info);
                        tracing::debug!(broker = BROKER, "reconnected");
                        (io, buf)
                    }
                    Err(e) => {
                        tracing::debug!(broker = BROKER, error = %e, "reconnect failed");
                        continue;
                    }
                }
            }
        };
        let reconnected = attempts > 0;
        attempts = 0;
        inner.up.store(true, Ordering::Release);
        let ended = session(&inner, &mut cmds, io, buf, &dialer.config, reconnected).await;
        inner.up.store(false, Ordering::Release);
        match ended {
            SessionEnd::Closed => break,
            SessionEnd::Lost(e) => {
                tracing::warn!(broker = BROKER, error = %e, "connection lost; reconnecting");
            }
        }
        if inner.closed.load(Ordering::Acquire) {
            break;
        }
    }
    inner.closed.store(true, Ordering::Release);
    let subs: Vec<Arc<Inbox>> = inner.subs.lock().drain().map(|(_, s)| s.inbox).collect();
    for inbox in subs {
        inbox.end();
    }
    inner.replies.lock().clear();
    // Fail whoever still waits for a flush.
    cmds.close();
    while cmds.try_recv().is_ok() {}
}

fn learn_servers(dialer: &mut Dialer, info: &async_nats::ServerInfo) {
    if dialer.config.ignore_discovered_servers {
        return;
    }
    for url in &info.connect_urls {
        let with_scheme = if url.contains("://") {
            url.clone()
        } else {
            format!("nats://{url}")
        };
        if let Ok(addr) = with_scheme.parse::<ServerAddr>() {
            if !dialer
                .servers
                .iter()
                .any(|s| s.host() == addr.host() && s.port() == addr.port())
            {
                dialer.servers.push(addr);
            }
        }
    }
}

/// One connected session: re-subscribes, then reads and writes until the connection
/// fails or the wire is closed.
async fn session(
    inner: &Arc<WireInner>,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    io: Box<dyn Io>,
    mut buf: BytesMut,
    config: &NatsConfig,
    reconnected: bool,
) -> SessionEnd {
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut out = BytesMut::with_capacity(64 * 1024);
    // Re-subscribe what exists (on the first session: whatever was subscribed meanwhile
    // is also still in the command queue; subscribing twice with the same sid is
    // harmless, the server keeps one).
    {
        let subs = inner.subs.lock();
        for (sid, s) in subs.iter() {
            encode_cmd(
                &mut out,
                &Cmd::Sub {
                    sid: *sid,
                    subject: s.subject.clone(),
                    queue: s.queue.clone(),
                },
            );
        }
    }
    // PONG waiters in the order their PINGs went out; `None` for keep-alive pings.
    let pongs: Arc<Mutex<VecDeque<Option<oneshot::Sender<()>>>>> = Arc::default();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<&'static [u8]>();
    let reader_inner = inner.clone();
    let reader_pongs = pongs.clone();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let reader_outstanding = outstanding.clone();
    let mut read_task = tokio::spawn(async move {
        loop {
            loop {
                match parse_op(&mut buf) {
                    Ok(Some(op)) => match op {
                        Op::Msg { sid, msg } => dispatch(&reader_inner, sid, msg),
                        Op::Ping => {
                            let _ = ctl_tx.send(b"PONG\r\n");
                        }
                        Op::Pong => {
                            reader_outstanding.store(0, Ordering::Relaxed);
                            if let Some(Some(tx)) = reader_pongs.lock().pop_front() {
                                let _ = tx.send(());
                            }
                        }
                        Op::Err(e) => {
                            tracing::warn!(broker = BROKER, error = %e, "server error");
                        }
                        Op::Info(info) => {
                            if info.max_payload > 0 {
                                reader_inner
                                    .max_payload
                                    .store(info.max_payload, Ordering::Relaxed);
                            }
                        }
                        Op::Other => {}
                    },
                    Ok(None) => break,
                    Err(e) => return e,
                }
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => {
                    return io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the server",
                    )
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    });
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.tick().await;
    let mut first = reconnected;
    let result = loop {
        if !out.is_empty() {
            if let Err(e) = writer.write_all(&out).await {
                break SessionEnd::Lost(e);
            }
            if let Err(e) = writer.flush().await {
                break SessionEnd::Lost(e);
            }
            out.clear();
        }
        if first {
            // Resubscribed: tell the users (pull requests are gone with the old
            // connection).
            first = false;
            inner.connects.send_modify(|n| *n += 1);
        }
        tokio::select! {
            biased;
            err = &mut read_task => {
                break match err {
                    Ok(e) => SessionEnd::Lost(e),
                    // The reader was cancelled: the runtime is shutting down (a process
                    // ending), not a lost connection; there is nothing to reconnect.
                    Err(e) if e.is_cancelled() => SessionEnd::Closed,
                    Err(e) => SessionEnd::Lost(io::Error::other(e.to_string())),
                };
            }
            ctl = ctl_rx.recv() => {
                if let Some(ctl) = ctl {
                    out.put_slice(ctl);
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break SessionEnd::Closed };
                let mut closing = false;
                let mut take = |cmd: Cmd, out: &mut BytesMut| match cmd {
                    Cmd::Close => closing = true,
                    Cmd::Ping(tx) => {
                        encode_cmd(out, &Cmd::Ping(oneshot::channel().0));
                        pongs.lock().push_back(Some(tx));
                    }
                    other => encode_cmd(out, &other),
                };
                take(cmd, &mut out);
                while out.len() < 256 * 1024 {
                    match cmds.try_recv() {
                        Ok(cmd) => take(cmd, &mut out),
                        Err(_) => break,
                    }
                }
                if closing {
                    let _ = writer.write_all(&out).await;
                    let _ = writer.flush().await;
                    inner.closed.store(true, Ordering::Release);
                    break SessionEnd::Closed;
                }
            }
            _ = ping.tick() => {
                if outstanding.fetch_add(1, Ordering::Relaxed) >= 2 {
                    break SessionEnd::Lost(io::Error::new(io::ErrorKind::TimedOut, "the server stopped answering pings"));
                }
                out.put_slice(b"PING\r\n");
                pongs.lock().push_back(None);
            }
        }
    };
    read_task.abort();
    // PINGs of this session will never be answered.
    pongs.lock().clear();
    let _ = writer.shutdown().await;
    result
}

fn dispatch(inner: &WireInner, sid: u64, msg: WireMsg) {
    let inbox = inner.subs.lock().get(&sid).map(|s| s.inbox.clone());
    let Some(inbox) = inbox else { return };
    if inbox.limit == 0 {
        // A reply to a request: routed by the last token of its subject.
        let token = msg
            .subject
            .rsplit(|b| *b == b'.')
            .next()
            .and_then(|t| std::str::from_utf8(t).ok())
            .map(str::to_owned);
        if let Some(tx) = token.and_then(|t| inner.replies.lock().remove(&t)) {
            let _ = tx.send(msg);
        }
        return;
    }
    inbox.push(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_with_any_header_bytes() {
        let mut buf = BytesMut::new();
        buf.put_slice(b"HMSG a.b 7 $JS.ACK.x 21 24\r\nNATS/1.0\r\nk: \xff\xfe v\r\n\r\nabc\r\nPING\r\nMSG s 1 0\r\n\r\n");
        let Some(Op::Msg { sid, msg }) = parse_op(&mut buf).unwrap() else {
            panic!("a message")
        };
        assert_eq!(sid, 7);
        assert_eq!(&msg.subject[..], b"a.b");
        assert_eq!(msg.reply.as_deref(), Some(&b"$JS.ACK.x"[..]));
        assert_eq!(
            msg.headers.as_deref(),
            Some(&b"NATS/1.0\r\nk: \xff\xfe v\r\n\r\n"[..])
        );
        assert_eq!(&msg.payload[..], b"abc");
        assert!(matches!(parse_op(&mut buf).unwrap(), Some(Op::Ping)));
        let Some(Op::Msg { msg, .. }) = parse_op(&mut buf).unwrap() else {
            panic!("a message")
        };
        assert!(msg.payload.is_empty() && msg.headers.is_none());
        assert!(parse_op(&mut buf).unwrap().is_none());
    }

    #[test]
    fn waits_for_the_whole_message() {
        let mut buf = BytesMut::new();
        buf.put_slice(b"MSG s 1 5\r\nab");
        assert!(parse_op(&mut buf).unwrap().is_none());
        buf.put_slice(b"cde\r\n");
        assert!(matches!(parse_op(&mut buf).unwrap(), Some(Op::Msg { .. })));
    }

    #[test]
    fn status_lines() {
        let msg = WireMsg {
            subject: Bytes::new(),
            reply: None,
            headers: Some(Bytes::from_static(b"NATS/1.0 409 Consumer Deleted\r\n\r\n")),
            payload: Bytes::new(),
        };
        assert_eq!(msg.status(), Some(409));
        assert_eq!(msg.description(), Some("Consumer Deleted"));
    }

    #[test]
    fn creds_files() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\n\n-----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n";
        assert_eq!(
            parse_creds(creds),
            Some(("eyJ0".to_owned(), "SUAB".to_owned()))
        );
    }
}
