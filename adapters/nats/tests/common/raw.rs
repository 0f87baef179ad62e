//! The plain client of the interop tests: the NATS protocol spoken over a `TcpStream`, so
//! a test can publish what no NATS library would build (header values that are not UTF-8,
//! bare CRs, status lines, lines without a colon) and read back the exact bytes a server
//! delivers.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A message as the server delivered it.
#[derive(Clone, Debug)]
pub struct RawMsg {
    pub subject: String,
    pub reply: Option<String>,
    /// The header block, from `NATS/1.0` to the empty line.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl RawMsg {
    /// The header lines (`name`, `value` without surrounding spaces), in order.
    pub fn lines(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let Some(block) = &self.headers else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in split_crlf(block).into_iter().skip(1) {
            if line.is_empty() {
                break;
            }
            if let Some(colon) = line.iter().position(|b| *b == b':') {
                let value = line[colon + 1..].trim_ascii();
                out.push((line[..colon].to_vec(), value.to_vec()));
            }
        }
        out
    }
}

fn split_crlf(b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\r' && b[i + 1] == b'\n' {
            out.push(&b[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    if start < b.len() {
        out.push(&b[start..]);
    }
    out
}

/// A raw protocol connection.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    msgs: VecDeque<RawMsg>,
    next: u64,
}

const LIMIT: Duration = Duration::from_secs(30);

impl RawClient {
    /// Connects to `host:port` (no authentication: the test server has none).
    pub async fn connect(host_port: &str) -> RawClient {
        let stream = TcpStream::connect(host_port)
            .await
            .unwrap_or_else(|e| panic!("raw connect to {host_port}: {e}"));
        let mut c = RawClient {
            stream,
            buf: Vec::new(),
            msgs: VecDeque::new(),
            next: 0,
        };
        let info = c.line().await;
        assert!(info.starts_with(b"INFO "), "no INFO");
        c.write(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1}\r\n")
            .await;
        c.ping().await;
        c
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("raw write: {e}"));
    }

    async fn fill(&mut self) {
        let mut chunk = vec![0u8; 1 << 16];
        let n = tokio::time::timeout(LIMIT, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("raw client: nothing from the server within {LIMIT:?}"))
            .unwrap_or_else(|e| panic!("raw read: {e}"));
        assert!(n > 0, "the server closed the raw connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..end].to_vec();
                self.buf.drain(..end + 2);
                return line;
            }
            self.fill().await;
        }
    }

    /// Reads one operation; messages go to the queue. Returns `true` on PONG.
    async fn op(&mut self) -> bool {
        let line = self.line().await;
        if line.starts_with(b"PING") {
            self.write(b"PONG\r\n").await;
            return false;
        }
        if line.starts_with(b"PONG") {
            return true;
        }
        if line.starts_with(b"-ERR") {
            panic!("server error: {}", String::from_utf8_lossy(&line));
        }
        let headers = line.starts_with(b"HMSG ");
        if !headers && !line.starts_with(b"MSG ") {
            return false;
        }
        let text = String::from_utf8(line).expect("control line");
        let args: Vec<&str> = text.split_whitespace().skip(1).collect();
        let (subject, reply, hlen, total) = match (headers, args.len()) {
            (false, 3) => (args[0], None, 0, args[2].parse::<usize>().unwrap()),
            (false, 4) => (args[0], Some(args[2]), 0, args[3].parse().unwrap()),
            (true, 4) => (
                args[0],
                None,
                args[2].parse().unwrap(),
                args[3].parse().unwrap(),
            ),
            (true, 5) => (
                args[0],
                Some(args[2]),
                args[3].parse().unwrap(),
                args[4].parse().unwrap(),
            ),
            _ => panic!("bad message line {text}"),
        };
        while self.buf.len() < total + 2 {
            self.fill().await;
        }
        let body: Vec<u8> = self.buf.drain(..total + 2).collect();
        self.msgs.push_back(RawMsg {
            subject: subject.to_owned(),
            reply: reply.map(str::to_owned),
            headers: headers.then(|| body[..hlen].to_vec()),
            payload: body[hlen..total].to_vec(),
        });
        false
    }

    /// Waits until the server processed everything sent before.
    pub async fn ping(&mut self) {
        self.write(b"PING\r\n").await;
        while !self.op().await {}
    }

    /// Subscribes to `subject` (confirmed by a round trip).
    pub async fn subscribe(&mut self, subject: &str) {
        self.next += 1;
        let sub = format!("SUB {subject} {}\r\n", self.next);
        self.write(sub.as_bytes()).await;
        self.ping().await;
    }

    /// The next message received.
    pub async fn next_msg(&mut self) -> RawMsg {
        loop {
            if let Some(m) = self.msgs.pop_front() {
                return m;
            }
            self.op().await;
        }
    }

    /// Publishes `payload` with the header block `headers` (`None`: a plain `PUB`).
    pub async fn publish(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        let mut out = match headers {
            Some(h) => format!(
                "HPUB {subject}{reply} {} {}\r\n",
                h.len(),
                h.len() + payload.len()
            )
            .into_bytes(),
            None => format!("PUB {subject}{reply} {}\r\n", payload.len()).into_bytes(),
        };
        if let Some(h) = headers {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        self.write(&out).await;
    }

    /// Publishes to a JetStream subject and returns the PubAck's JSON.
    pub async fn js_publish(
        &mut self,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> serde_json::Value {
        self.next += 1;
        let inbox = format!("_INBOX.raw.{}.{}", std::process::id(), self.next);
        self.subscribe(&inbox).await;
        self.publish(subject, Some(&inbox), headers, payload).await;
        loop {
            if let Some(pos) = self.msgs.iter().position(|m| m.subject == inbox) {
                let m = self.msgs.remove(pos).expect("found");
                let ack: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                        panic!("PubAck {:?}: {e}", String::from_utf8_lossy(&m.payload))
                    });
                assert!(ack.get("error").is_none(), "publish refused: {ack}");
                return ack;
            }
            self.op().await;
        }
    }
}
