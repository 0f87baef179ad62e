//! Messages from and to plain NATS clients, against the server of brokers
//! (`TIDEMILL_NATS_URL`): whatever a client can publish is delivered with its bytes (and
//! never stalls the topic), a pass-through handler republishes it unchanged, the attempt
//! count cannot be spoofed, and Watermill's uuid header works both ways. The plain client
//! is the raw protocol over a `TcpStream` (`tests/common/raw.rs`), since async-nats
//! cannot build (or receive) some of these messages.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use common::raw::{RawClient, RawMsg};
use common::{delete_streams, host_port, ok, test_config};
use futures::StreamExt;
use tidemill_core::{
    Delivery, DeliveryStream, Message, Publisher, Router, RouterConfig, SubscribeOptions,
    Subscriber,
};
use tidemill_nats::{NatsConfig, NatsMode, NatsPublisher, NatsRecord, NatsSubscriber, UuidHeader};
use tidemill_testkit::unique_topic;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

fn url() -> Option<String> {
    match std::env::var("TIDEMILL_NATS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("SKIP: TIDEMILL_NATS_URL is not set (no broker to test against)");
            None
        }
    }
}

async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    match timeout(LIMIT, stream.next()).await {
        Err(_) => panic!("nothing within {LIMIT:?} while waiting for {what}"),
        Ok(None) => panic!("the stream ended while waiting for {what}"),
        Ok(Some(Err(e))) => panic!("stream error while waiting for {what}: {e}"),
        Ok(Some(Ok(d))) => d,
    }
}

/// One odd input: its header block (`None`: no headers), payload, and what the Tidemill
/// subscriber must see.
struct Case {
    name: &'static str,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
    /// Checks what the Tidemill subscriber saw; the flag tells JetStream (which stores
    /// a status line as a plain `NATS/1.0`) from core NATS.
    check: fn(&Message, bool),
}

/// The header block as JetStream stores it: a status line on the first line is dropped
/// (the server keeps `NATS/1.0` and the header lines; no lines, no headers).
fn stored(headers: &Option<Vec<u8>>) -> Option<Vec<u8>> {
    let h = headers.as_ref()?;
    let end = h.windows(2).position(|w| w == b"\r\n")?;
    let mut out = b"NATS/1.0".to_vec();
    out.extend_from_slice(&h[end..]);
    // Nothing left: delivered without headers.
    (out != b"NATS/1.0\r\n\r\n").then_some(out)
}

fn block(lines: &[&[u8]]) -> Vec<u8> {
    let mut b = b"NATS/1.0\r\n".to_vec();
    for l in lines {
        b.extend_from_slice(l);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b
}

fn record(m: &Message) -> &NatsRecord {
    NatsRecord::of(m).expect("every delivered message carries its NatsRecord")
}

fn values<'a>(m: &'a Message, name: &'a [u8]) -> Vec<&'a [u8]> {
    record(m).values(name).collect()
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn cases() -> Vec<Case> {
    let big_value = vec![b'v'; 8 * 1024];
    let mut big_line = b"big: ".to_vec();
    big_line.extend_from_slice(&big_value);
    let many: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("h{i}: value {i}").into_bytes())
        .collect();
    let many_refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
    vec![
        Case {
            name: "non-UTF-8 header value",
            headers: Some(block(&[b"bin: \xff\xfe\x80 tail", b"text: ok"])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(values(m, b"bin"), vec![&b"\xff\xfe\x80 tail"[..]]);
                assert_eq!(
                    m.metadata().get("bin.b64"),
                    Some(b64(b"\xff\xfe\x80 tail").as_str())
                );
                assert_eq!(m.metadata().get("text"), Some("ok"));
            },
        },
        Case {
            name: "binary value with a NUL and a bare CR",
            headers: Some(block(&[b"raw: a\x00b\rc"])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(values(m, b"raw"), vec![&b"a\x00b\rc"[..]]);
                assert_eq!(m.metadata().get("raw"), Some("a\0b\rc"));
            },
        },
        Case {
            name: "non-UTF-8 header name",
            headers: Some(block(&[b"n\xffme: v", b"other: w"])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(values(m, b"n\xffme"), vec![&b"v"[..]]);
                assert_eq!(m.metadata().len(), 1, "{:?}", m.metadata());
            },
        },
        Case {
            name: "duplicate keys",
            headers: Some(block(&[b"dup: 1", b"other: x", b"dup: 2", b"dup: 3"])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(values(m, b"dup"), vec![&b"1"[..], b"2", b"3"]);
                assert_eq!(m.metadata().get("dup"), Some("3"));
                let names: Vec<&[u8]> = record(m).headers().iter().map(|h| h.name()).collect();
                assert_eq!(names, vec![&b"dup"[..], b"other", b"dup", b"dup"]);
            },
        },
        Case {
            name: "encoded-word look-alikes in names and values",
            headers: Some(block(&[
                b"word: =?utf-8?b?aGk=?=",
                b"=?utf-8?b?aGk=?=: name",
            ])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(m.metadata().get("word"), Some("=?utf-8?b?aGk=?="));
                assert_eq!(m.metadata().get("=?utf-8?b?aGk=?="), Some("name"));
            },
        },
        Case {
            name: "status-like header line (503)",
            headers: Some(b"NATS/1.0 503\r\nx: y\r\n\r\n".to_vec()),
            payload: b"p".to_vec(),
            check: |m, js| {
                // JetStream stores the message without its status line.
                assert_eq!(record(m).status(), (!js).then_some(503));
                assert_eq!(m.metadata().get("x"), Some("y"));
            },
        },
        Case {
            name: "status-like header line (idle heartbeat)",
            headers: Some(b"NATS/1.0 100 Idle Heartbeat\r\n\r\n".to_vec()),
            payload: b"heartbeat?".to_vec(),
            check: |m, js| {
                assert_eq!(record(m).status(), (!js).then_some(100));
                assert_eq!(record(m).description(), (!js).then_some("Idle Heartbeat"));
                assert_eq!(m.payload().as_ref(), b"heartbeat?");
            },
        },
        Case {
            name: "server-like headers and a spoofed attempt",
            headers: Some(block(&[
                b"Nats-Pending-Messages: 5",
                b"tidemill-attempt: 9",
                b"Nats-Num-Delivered: 7",
            ])),
            payload: b"p".to_vec(),
            check: |m, js| {
                assert_eq!(m.metadata().get("tidemill-attempt"), Some("9"));
                assert_eq!(record(m).num_delivered(), js.then_some(1));
            },
        },
        Case {
            name: "a line without colon and a folded line",
            headers: Some(block(&[b"just text", b"k: first", b"  second"])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(m.metadata().get("k"), Some("first second"));
                assert_eq!(m.metadata().len(), 1);
            },
        },
        Case {
            name: "8 KB header value",
            headers: Some(block(&[&big_line])),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(m.metadata().get("big").map(str::len), Some(8 * 1024));
            },
        },
        Case {
            name: "200 headers",
            headers: Some(block(&many_refs)),
            payload: b"p".to_vec(),
            check: |m, _js| {
                assert_eq!(m.metadata().len(), 200);
                assert_eq!(m.metadata().get("h199"), Some("value 199"));
            },
        },
        Case {
            name: "empty payload with headers",
            headers: Some(block(&[b"only: headers"])),
            payload: Vec::new(),
            check: |m, _js| {
                assert!(m.payload().is_empty());
                assert_eq!(m.metadata().get("only"), Some("headers"));
            },
        },
        Case {
            name: "empty payload without headers",
            headers: None,
            payload: Vec::new(),
            check: |m, _js| {
                assert!(m.payload().is_empty());
                assert!(m.metadata().is_empty());
            },
        },
        Case {
            name: "1 MB payload",
            headers: Some(block(&[b"size: 1MB"])),
            payload: (0..1_000_000u32).map(|i| (i % 251) as u8).collect(),
            check: |m, _js| {
                assert_eq!(m.payload().len(), 1_000_000);
                assert!(m
                    .payload()
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == (i % 251) as u8));
            },
        },
    ]
}

/// Every odd input a plain client publishes to a JetStream topic is delivered, with its
/// bytes, attempt 1 (whatever its headers say), and the good message published right
/// after it is delivered too; the subscriber's connection never drops.
#[tokio::test]
async fn odd_messages_are_delivered_and_never_stall_the_topic() {
    let Some(url) = url() else { return };
    let topic = unique_topic("odd");
    let config = test_config(&url);
    let s = ok(NatsSubscriber::connect(config.clone()).await, "subscriber");
    let group = SubscribeOptions::group("interop");
    ok(s.initialize(&topic, &group).await, "initialize");
    let mut raw = RawClient::connect(&host_port(&url)).await;
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        raw.js_publish(&topic, case.headers.as_deref(), &case.payload)
            .await;
        let good = format!("good {i}");
        raw.js_publish(&topic, Some(&block(&[b"kind: good"])), good.as_bytes())
            .await;
    }
    let mut stream = ok(s.subscribe(&topic, group).await, "subscribe");
    for (i, case) in cases.iter().enumerate() {
        let d = next(&mut stream, case.name).await;
        assert_eq!(d.attempt(), Some(1), "{}", case.name);
        assert_eq!(
            d.message().payload().as_ref(),
            case.payload.as_slice(),
            "{}",
            case.name
        );
        (case.check)(d.message(), true);
        let r = record(d.message());
        assert_eq!(r.stream_sequence(), Some(2 * i as u64 + 1), "{}", case.name);
        assert_eq!(
            r.raw_headers().map(|b| b.to_vec()),
            stored(&case.headers),
            "{}",
            case.name
        );
        assert!(r.timestamp().is_some() && r.consumer().is_some());
        ok(d.ack().await, "ack");
        let good = next(&mut stream, "the good message after it").await;
        assert_eq!(
            good.message().payload().as_ref(),
            format!("good {i}").as_bytes(),
            "after {}",
            case.name
        );
        ok(good.ack().await, "ack");
    }
    assert_eq!(
        s.delivery_connects(),
        1,
        "the delivery connection never dropped"
    );
    ok(s.close().await, "close");
    delete_streams(&url, &[topic]).await;
}

/// Core NATS: odd inputs are delivered the same way (at most once), and the
/// subscription's connection survives them.
#[tokio::test]
async fn odd_messages_reach_core_nats_subscribers() {
    let Some(url) = url() else { return };
    let config = NatsConfig {
        mode: NatsMode::Core,
        ..test_config(&url)
    };
    let topic = unique_topic("odd_core");
    let s = ok(NatsSubscriber::connect(config).await, "subscriber");
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    let mut raw = RawClient::connect(&host_port(&url)).await;
    let cases = cases();
    for case in &cases {
        raw.publish(&topic, None, case.headers.as_deref(), &case.payload)
            .await;
    }
    raw.ping().await;
    for case in &cases {
        let d = next(&mut stream, case.name).await;
        assert_eq!(
            d.message().payload().as_ref(),
            case.payload.as_slice(),
            "{}",
            case.name
        );
        (case.check)(d.message(), false);
        assert_eq!(
            record(d.message()).raw_headers().map(|b| b.to_vec()),
            case.headers,
            "{}",
            case.name
        );
        assert_eq!(d.attempt(), None);
    }
    assert_eq!(s.delivery_connects(), 1);
    ok(s.close().await, "close");
}

/// The header lines of `m` grouped by name (values in order): what a plain consumer
/// reads. NATS clients expose headers as a map of names to value lists; the order of
/// different names is not kept when the headers can go through async-nats.
fn by_name(lines: Vec<(Vec<u8>, Vec<u8>)>) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
    let mut out: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (n, v) in lines {
        out.entry(n).or_default().push(v);
    }
    out
}

/// A handler that returns its input unchanged, between two JetStream topics, republishes
/// every odd input so that a plain consumer of the second topic sees the same payload and
/// headers (same names, same values in the same order), plus Tidemill's `Nats-Msg-Id`
/// where the original had none; a message with raw header bytes or a status line comes
/// out byte for byte, and a foreign `Nats-Msg-Id` is kept as it was.
#[tokio::test]
async fn a_pass_through_handler_republishes_foreign_messages_unchanged() {
    let Some(url) = url() else { return };
    let (input, output) = (unique_topic("pass_in"), unique_topic("pass_out"));
    let config = test_config(&url);
    let s = ok(NatsSubscriber::connect(config.clone()).await, "subscriber");
    let p = ok(NatsPublisher::connect(config.clone()).await, "publisher");
    // The output topic's stream exists before the plain consumer subscribes to its subject.
    ok(p.retain_for(&output, "plain").await, "retain_for");
    let mut consumer = RawClient::connect(&host_port(&url)).await;
    consumer.subscribe(&output).await;
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("pass")
        .subscribe(s.clone(), &input)
        .group("pass")
        .publish(p.clone(), &output)
        .handler(|m: Message| async move { Ok::<_, tidemill_core::BoxError>(m) })
        .await
        .unwrap_or_else(|e| panic!("handler: {e}"));
    let runner = {
        let router = router.clone();
        tokio::spawn(async move { router.run().await })
    };
    router.running().await;
    let mut cases: Vec<(Option<Vec<u8>>, Vec<u8>)> = cases()
        .into_iter()
        .map(|c| (stored(&c.headers), c.payload))
        .collect();
    cases.push((
        Some(block(&[b"Nats-Msg-Id: order-1-created", b"a: 1", b"a: 2"])),
        b"with id".to_vec(),
    ));
    let mut producer = RawClient::connect(&host_port(&url)).await;
    for (headers, payload) in &cases {
        producer
            .js_publish(&input, headers.as_deref(), payload)
            .await;
    }
    for (i, (headers, payload)) in cases.iter().enumerate() {
        let got: RawMsg = timeout(LIMIT, consumer.next_msg())
            .await
            .unwrap_or_else(|_| panic!("case {i}: nothing on the output topic"));
        assert_eq!(&got.payload, payload, "case {i}");
        let sent = RawMsg {
            subject: input.clone(),
            reply: None,
            headers: headers.clone(),
            payload: payload.clone(),
        };
        let mut want = by_name(sent.lines());
        let mut have = by_name(got.lines());
        let ids = have.remove(b"Nats-Msg-Id".as_slice());
        match want.remove(b"Nats-Msg-Id".as_slice()) {
            Some(original) => assert_eq!(ids, Some(original), "case {i}: a foreign id is kept"),
            None => assert_eq!(
                ids.map(|v| v.len()),
                Some(1),
                "case {i}: Tidemill's id added"
            ),
        }
        assert_eq!(have, want, "case {i}");
        if let Some(original) = headers {
            let canonical = {
                let mut b = b"NATS/1.0\r\n".to_vec();
                for (n, v) in sent.lines() {
                    b.extend_from_slice(&n);
                    b.extend_from_slice(b": ");
                    b.extend_from_slice(&v);
                    b.extend_from_slice(b"\r\n");
                }
                b.extend_from_slice(b"\r\n");
                b
            };
            let needs_raw = std::str::from_utf8(original).is_err()
                || original.contains(&b'\0')
                || !original.starts_with(b"NATS/1.0\r\n")
                || canonical != *original;
            if needs_raw {
                // Written as received, byte for byte (Tidemill's id appended).
                let got_headers = got.headers.clone().unwrap_or_default();
                assert!(
                    got_headers.starts_with(&original[..original.len() - 2]),
                    "case {i}: {:?} should start with {:?}",
                    String::from_utf8_lossy(&got_headers),
                    String::from_utf8_lossy(original)
                );
            }
        }
    }
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    let _ = runner.await;
    ok(s.close().await, "close");
    ok(p.close().await, "close");
    delete_streams(&url, &[input, output]).await;
}

/// Watermill's `_watermill_message_uuid`: a Tidemill publisher configured for it writes
/// the bare uuid there (what a Watermill service reads), and a Tidemill subscriber with
/// the default configuration reads the uuid a Watermill service wrote.
#[tokio::test]
async fn watermill_uuid_header_both_ways() {
    let Some(url) = url() else { return };
    let topic = unique_topic("watermill");
    let mut config = test_config(&url);
    config.uuid_header = UuidHeader::Watermill;
    let p = ok(NatsPublisher::connect(config).await, "publisher");
    ok(p.retain_for(&topic, "g").await, "retain_for");
    let mut plain = RawClient::connect(&host_port(&url)).await;
    plain.subscribe(&topic).await;
    let m = Message::new("{}").with_metadata("name", "OrderPlaced");
    ok(p.publish_one(&topic, m.clone()).await, "publish");
    let got = timeout(LIMIT, plain.next_msg())
        .await
        .expect("the plain consumer got it");
    let lines = by_name(got.lines());
    assert_eq!(
        lines.get(b"_watermill_message_uuid".as_slice()),
        Some(&vec![m.uuid().as_bytes().to_vec()])
    );
    assert_eq!(
        lines.get(b"name".as_slice()),
        Some(&vec![b"OrderPlaced".to_vec()])
    );

    // The other way: what a Watermill service publishes.
    let s = ok(
        NatsSubscriber::connect(test_config(&url)).await,
        "subscriber",
    );
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let first = next(&mut stream, "Tidemill's own message").await;
    assert_eq!(
        first.message(),
        &m,
        "read back with the default configuration"
    );
    ok(first.ack().await, "ack");
    plain
        .js_publish(
            &topic,
            Some(&block(&[
                b"_watermill_message_uuid: wm-42",
                b"name: OrderShipped",
            ])),
            b"{}",
        )
        .await;
    let d = next(&mut stream, "the Watermill message").await;
    assert_eq!(d.message().uuid(), "wm-42");
    assert_eq!(d.message().metadata().get("name"), Some("OrderShipped"));
    assert_eq!(d.message().metadata().len(), 1);
    ok(d.ack().await, "ack");
    ok(s.close().await, "close");
    ok(p.close().await, "close");
    delete_streams(&url, &[topic]).await;
}

/// `UuidHeader::NatsMsgId`: the bare uuid is JetStream's message id, what plain clients
/// read; `UuidHeader::Header` puts it in a plain header of that name.
#[tokio::test]
async fn uuid_in_plain_headers() {
    let Some(url) = url() else { return };
    for (mode, name) in [
        (UuidHeader::NatsMsgId, "Nats-Msg-Id"),
        (UuidHeader::Header("x-message-id".into()), "x-message-id"),
    ] {
        let topic = unique_topic("uuid_plain");
        let mut config = test_config(&url);
        config.uuid_header = mode.clone();
        let p = ok(NatsPublisher::connect(config.clone()).await, "publisher");
        let s = ok(NatsSubscriber::connect(config).await, "subscriber");
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::new()).await,
            "subscribe",
        );
        let mut plain = RawClient::connect(&host_port(&url)).await;
        plain.subscribe(&topic).await;
        let m = Message::new("x").with_metadata("a", "b");
        ok(p.publish_one(&topic, m.clone()).await, "publish");
        let got = timeout(LIMIT, plain.next_msg())
            .await
            .expect("plain consumer");
        let lines = by_name(got.lines());
        assert_eq!(
            lines.get(name.as_bytes()),
            Some(&vec![m.uuid().as_bytes().to_vec()]),
            "{mode:?}"
        );
        let d = next(&mut stream, "the message").await;
        assert_eq!(d.message(), &m, "{mode:?}");
        ok(d.ack().await, "ack");
        ok(s.close().await, "close");
        ok(p.close().await, "close");
        delete_streams(&url, &[topic]).await;
    }
}

/// Why Tidemill receives on a connection of its own: async-nats fails its whole
/// connection on a header value that is not UTF-8 (then reconnects; a JetStream consumer
/// gets the message again after `ack_wait`, and the connection fails again). When this
/// test fails, async-nats has learned to receive such messages.
#[tokio::test]
async fn async_nats_drops_its_connection_on_a_non_utf8_header() {
    let Some(url) = url() else { return };
    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let subject = unique_topic("async_nats_canary");
    let _sub = client
        .subscribe(subject.clone())
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    client
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    let connects = || {
        client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = connects();
    let mut raw = RawClient::connect(&host_port(&url)).await;
    raw.publish(&subject, None, Some(&block(&[b"bin: \xff"])), b"x")
        .await;
    raw.ping().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while connects() <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "async-nats kept its connection: it may now receive non-UTF-8 header values"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
