//! Tests of the fault proxy against a small echo server, over real TCP on
//! 127.0.0.1. Waits are bounded with generous limits; the only short waits are
//! for things that must *not* happen (bytes during a stall), which cannot fail
//! spuriously.

use std::net::SocketAddr;
use std::time::Duration;

use tidemill_testkit::fault_proxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Upper bound for anything that must happen.
const LIMIT: Duration = Duration::from_secs(10);
/// How long we watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

/// An echo server; reports every upstream connection that ends.
struct Echo {
    addr: SocketAddr,
    closed: mpsc::UnboundedReceiver<()>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tx.send(());
            });
        }
    });
    Echo { addr, closed }
}

/// Sends `msg` and reads the echo, writing and reading at the same time (a
/// large message would otherwise fill every buffer on the way).
async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    let (mut r, mut w) = s.split();
    let mut got = vec![0u8; msg.len()];
    let (wrote, read) = timeout(LIMIT, async {
        tokio::join!(w.write_all(msg), r.read_exact(&mut got))
    })
    .await
    .expect("round trip timed out");
    wrote.unwrap();
    read.unwrap();
    assert_eq!(got, msg);
}

/// Reads until the connection ends (EOF or error); panics after LIMIT.
async fn wait_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    timeout(LIMIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("connection was not closed");
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    timeout(LIMIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn forwards_both_ways() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    assert_eq!(proxy.upstream(), echo.addr);
    assert!(proxy.addr().ip().is_loopback());

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"first").await;
    round_trip(&mut b, b"second").await;
    let big = vec![7u8; 1 << 20];
    round_trip(&mut a, &big).await;
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.active_connections(), 2);

    drop(a);
    wait_until("one connection to end", || proxy.active_connections() == 1).await;
}

#[tokio::test]
async fn cut_closes_every_connection_and_accepts_new_ones() {
    let mut echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();

    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"a").await;
    round_trip(&mut b, b"b").await;

    proxy.cut();
    wait_closed(&mut a).await;
    wait_closed(&mut b).await;
    // The upstream side of both connections was closed too.
    for _ in 0..2 {
        timeout(LIMIT, echo.closed.recv())
            .await
            .expect("upstream connection not closed")
            .unwrap();
    }
    wait_until("no active connection", || proxy.active_connections() == 0).await;

    // The proxy still accepts, and new connections work.
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut c, b"after the cut").await;
    assert_eq!(proxy.connections(), 3);

    // A second cut only affects what exists then.
    proxy.cut();
    wait_closed(&mut c).await;
    let mut d = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut d, b"again").await;
}

#[tokio::test]
async fn stall_holds_bytes_and_resume_delivers_them() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"before").await;

    proxy.stall();
    assert!(proxy.is_stalled());
    a.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(
        timeout(QUIET, a.read_exact(&mut buf)).await.is_err(),
        "bytes went through a stalled proxy"
    );

    // Connections made while stalled are accepted but stall too.
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    b.write_all(b"new!").await.unwrap();
    let mut buf_b = [0u8; 4];
    assert!(
        timeout(QUIET, b.read_exact(&mut buf_b)).await.is_err(),
        "a new connection was not stalled"
    );
    // Nothing was closed by the stall.
    assert_eq!(proxy.active_connections(), 2);

    proxy.resume();
    assert!(!proxy.is_stalled());
    // Everything held is delivered, in order, nothing lost.
    timeout(LIMIT, a.read_exact(&mut buf))
        .await
        .expect("held bytes not delivered after resume")
        .unwrap();
    assert_eq!(&buf, b"held");
    timeout(LIMIT, b.read_exact(&mut buf_b))
        .await
        .expect("new connection's bytes not delivered after resume")
        .unwrap();
    assert_eq!(&buf_b, b"new!");
    round_trip(&mut a, b"after").await;
    round_trip(&mut b, b"after").await;
}

#[tokio::test]
async fn cut_while_stalled_closes_and_new_connections_stall() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"x").await;

    proxy.stall();
    proxy.cut();
    wait_closed(&mut a).await;

    proxy.resume();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut b, b"y").await;
}

#[tokio::test]
async fn refuse_new_closes_new_connections_only() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"open").await;

    proxy.refuse_new(true);
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    wait_closed(&mut refused).await;
    assert_eq!(proxy.refused_connections(), 1);
    // The existing connection is untouched.
    round_trip(&mut a, b"still open").await;

    proxy.refuse_new(false);
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut b, b"accepted again").await;
    assert_eq!(proxy.connections(), 2);
}

#[tokio::test]
async fn unreachable_upstream_closes_the_client() {
    // A port nobody listens on: bind, note it, close.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = FaultProxy::start(addr).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    wait_closed(&mut a).await;
}

#[tokio::test]
async fn shutdown_and_drop_close_everything() {
    let echo = echo_server().await;

    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let addr = proxy.addr();
    let mut a = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut a, b"1").await;
    timeout(LIMIT, proxy.shutdown())
        .await
        .expect("shutdown hung");
    wait_closed(&mut a).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");

    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let addr = proxy.addr();
    let mut b = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut b, b"2").await;
    drop(proxy);
    wait_closed(&mut b).await;
    timeout(LIMIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("listener not closed after drop");
}
