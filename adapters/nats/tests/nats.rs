//! NATS-specific behaviour against the server of brokers (`TIDEMILL_NATS_URL`):
//! the header mapping over the wire, messages from other clients, deduplication, limits
//! and bad input, stream and consumer naming, in-progress acks, flow control, and what
//! core NATS (at most once) does and does not do.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::{delete_streams, ok, test_config};
use futures::StreamExt;
use tidemill_core::{
    Delivery, DeliveryStream, Error, Message, Publisher, SubscribeOptions, Subscriber,
};
use tidemill_nats::{NatsConfig, NatsMode, NatsPublisher, NatsSubscriber};
use tidemill_testkit::unique_topic;
use tokio::time::{timeout, Instant};

/// The longest any single wait may take.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a negative check ("nothing arrives") waits.
const QUIET: Duration = Duration::from_millis(500);

fn url() -> Option<String> {
    match std::env::var("TIDEMILL_NATS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("SKIP: TIDEMILL_NATS_URL is not set (no broker to test against)");
            None
        }
    }
}

async fn pair(config: &NatsConfig) -> (NatsPublisher, NatsSubscriber) {
    (
        ok(NatsPublisher::connect(config.clone()).await, "publisher"),
        ok(NatsSubscriber::connect(config.clone()).await, "subscriber"),
    )
}

async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    match timeout(LIMIT, stream.next()).await {
        Err(_) => panic!("nothing within {LIMIT:?} while waiting for {what}"),
        Ok(None) => panic!("the stream ended while waiting for {what}"),
        Ok(Some(Err(e))) => panic!("stream error while waiting for {what}: {e}"),
        Ok(Some(Ok(d))) => d,
    }
}

async fn quiet(stream: &mut DeliveryStream, what: &str) {
    if let Ok(Some(Ok(d))) = timeout(QUIET, stream.next()).await {
        panic!("{what}: {:?} arrived", d.message());
    }
}

/// Metadata, uuid, key and payload survive the trip through the server unchanged, also
/// when NATS headers cannot carry them as they are (line breaks, surrounding whitespace,
/// non-ASCII or empty names, names the adapter uses itself).
#[tokio::test]
async fn awkward_metadata_survives_the_wire_in_both_modes() {
    let Some(url) = url() else { return };
    for mode in [NatsMode::JetStream, NatsMode::Core] {
        let mut config = test_config(&url);
        config.mode = mode;
        let topic = unique_topic("awkward_metadata");
        let (p, s) = pair(&config).await;
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::new()).await,
            "subscribe",
        );
        let mut m = Message::with_uuid("my own id, not a UUID", vec![0u8, 0xff, b'\r', b'\n', 7])
            .with_key([0xffu8, 0x00, 0x10]);
        let awkward = [
            ("plain", "value"),
            ("empty", ""),
            ("unicode", "héllo wörld ✓"),
            ("leading", "  two spaces"),
            ("trailing", "tab\t"),
            ("lines", "first\r\nsecond\nthird"),
            ("word", "=?utf-8?b?aGk=?="),
            ("with space", "v"),
            ("colon:name", "v"),
            ("ключ", "значение"),
            ("", "empty name"),
            ("tidemill-key", "not the key"),
            ("Nats-Msg-Id-like", "x"),
        ];
        for (k, v) in awkward {
            m = m.with_metadata(k, v);
        }
        let text_key = Message::new("text key").with_key(" padded key\n");
        ok(
            p.publish(&topic, vec![m.clone(), text_key.clone()]).await,
            "publish",
        );
        for want in [&m, &text_key] {
            let d = next(&mut stream, "the awkward message").await;
            assert_eq!(d.message(), want, "{mode:?}");
            ok(d.ack().await, "ack");
        }
        ok(p.close().await, "close");
        ok(s.close().await, "close");
        delete_streams(&url, &[topic]).await;
    }
}

/// A message published by another client (no Tidemill headers) is received with its
/// headers as metadata and a uuid derived from its stream position, the same on every
/// redelivery; a `Nats-Msg-Id` set by the other client becomes the uuid.
#[tokio::test]
async fn messages_from_other_clients_get_stable_uuids() {
    let Some(url) = url() else { return };
    let config = test_config(&url);
    let topic = unique_topic("foreign");
    let s = ok(NatsSubscriber::connect(config.clone()).await, "subscriber");
    ok(
        s.initialize(&topic, &SubscribeOptions::group("g")).await,
        "initialize",
    );
    let raw = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(raw.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("trace-id", "abc-123");
    js.publish_with_headers(topic.clone(), headers, Bytes::from_static(b"foreign"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut with_id = async_nats::HeaderMap::new();
    with_id.insert("Nats-Msg-Id", "order-42");
    js.publish_with_headers(topic.clone(), with_id, Bytes::from_static(b"with id"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let first = next(&mut stream, "the foreign message").await;
    let uuid = first.message().uuid().to_owned();
    assert_eq!(first.message().payload().as_ref(), b"foreign");
    assert_eq!(first.message().metadata().get("trace-id"), Some("abc-123"));
    assert_eq!(first.message().metadata().len(), 1);
    assert_eq!(first.message().key(), None);
    assert_eq!(uuid.len(), 36, "a derived UUID: {uuid}");
    ok(first.nack().await, "nack");
    // Without a key the nack goes to the server, which redelivers: same uuid.
    let mut seen_again = None;
    let mut with_id_uuid = None;
    while seen_again.is_none() || with_id_uuid.is_none() {
        let d = next(&mut stream, "the redelivery").await;
        if d.message().payload().as_ref() == b"foreign" {
            assert_eq!(d.attempt(), Some(2));
            seen_again = Some(d.message().uuid().to_owned());
        } else {
            with_id_uuid = Some(d.message().uuid().to_owned());
            assert!(d.message().metadata().is_empty());
        }
        ok(d.ack().await, "ack");
    }
    assert_eq!(seen_again.as_deref(), Some(uuid.as_str()));
    assert_eq!(with_id_uuid.as_deref(), Some("order-42"));

    // Core NATS: no stream position; the content identifies the message.
    let core = NatsConfig {
        mode: NatsMode::Core,
        ..test_config(&url)
    };
    let cs = ok(NatsSubscriber::connect(core).await, "core subscriber");
    let core_topic = unique_topic("foreign_core");
    let mut a = ok(
        cs.subscribe(&core_topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    let mut b = ok(
        cs.subscribe(&core_topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    raw.publish(core_topic.clone(), Bytes::from_static(b"plain"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    raw.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let (da, db) = (next(&mut a, "core a").await, next(&mut b, "core b").await);
    assert_eq!(da.message().uuid(), db.message().uuid());
    assert_eq!(da.message().payload().as_ref(), b"plain");
    assert!(da.message().metadata().is_empty());
    ok(s.close().await, "close");
    delete_streams(&url, &[topic]).await;
}

/// Publishing the same message twice (a retry) stores it once: its uuid (with a hash of
/// its content) is the JetStream message id, deduplicated within `duplicate_window`. The
/// same uuid republished with other metadata (a dead-letter layer's copy carrying a failure
/// count) is a new message and is stored.
#[tokio::test]
async fn republishing_a_message_stores_it_once() {
    let Some(url) = url() else { return };
    let (logs, _guard) = Logs::capture(tracing::Level::WARN);
    let config = test_config(&url);
    let topic = unique_topic("dedup");
    let (p, s) = pair(&config).await;
    ok(
        s.initialize(&topic, &SubscribeOptions::group("g")).await,
        "initialize",
    );
    let m = Message::new("once");
    ok(
        p.publish(&topic, vec![m.clone(), m.clone()]).await,
        "publish",
    );
    ok(p.publish_one(&topic, m.clone()).await, "publish again");
    // Publishing succeeded, but stored nothing new: a warning says so.
    let warned = logs.text();
    assert!(
        warned.contains("dropped the message as a duplicate") && warned.contains(m.uuid()),
        "{warned}"
    );
    let other = Message::new("other");
    ok(p.publish_one(&topic, other.clone()).await, "publish");
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let d = next(&mut stream, "the message").await;
    assert_eq!(d.message(), &m);
    ok(d.ack().await, "ack");
    let d = next(&mut stream, "the other message").await;
    assert_eq!(
        d.message(),
        &other,
        "the duplicates were dropped by the stream"
    );
    ok(d.ack().await, "ack");
    quiet(&mut stream, "after the two distinct messages").await;
    let copy = m.clone().with_metadata("failures", "1");
    ok(p.publish_one(&topic, copy.clone()).await, "republish");
    let d = next(&mut stream, "the republished copy").await;
    assert_eq!(d.message(), &copy);
    assert_eq!(d.message().uuid(), m.uuid());
    ok(d.ack().await, "ack");
    delete_streams(&url, &[topic]).await;
}

/// A message over the server's `max_payload` fails with an error naming the limit, in
/// both modes, and nothing of it is delivered.
#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_with_the_limit() {
    let Some(url) = url() else { return };
    for mode in [NatsMode::JetStream, NatsMode::Core] {
        let config = NatsConfig {
            mode,
            ..test_config(&url)
        };
        let topic = unique_topic("too_large");
        let p = ok(NatsPublisher::connect(config).await, "publisher");
        let limit = p.client().server_info().max_payload;
        let big = Message::new(vec![7u8; limit + 1]);
        let err = p
            .publish_one(&topic, big.clone())
            .await
            .expect_err("an oversized message must be refused");
        match &err {
            Error::MessageTooLarge {
                limit: l,
                topic: t,
                uuid,
                ..
            } => {
                assert_eq!(*l, limit);
                assert_eq!(t, &topic);
                assert_eq!(uuid, big.uuid());
            }
            other => panic!("{mode:?}: expected MessageTooLarge, got {other}"),
        }
        assert!(err.to_string().contains(&limit.to_string()), "{err}");
        assert!(!err.is_transient());
        // The publisher still works.
        ok(
            p.publish_one(&topic, Message::new("small")).await,
            "publish",
        );
        delete_streams(&url, &[topic]).await;
    }
}

/// An unreachable server fails within `connect_timeout`, naming the address: a refused
/// port at once, a server that accepts but never answers after the timeout.
#[tokio::test]
async fn an_unreachable_server_fails_fast_naming_the_address() {
    // No broker needed.
    let refused = NatsConfig {
        connect_timeout: Duration::from_secs(5),
        ..NatsConfig::new("nats://127.0.0.1:1")
    };
    let started = Instant::now();
    let err = NatsPublisher::connect(refused)
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(started.elapsed() < LIMIT);

    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = silent.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket); // accepted, never answered
        }
    });
    let config = NatsConfig {
        connect_timeout: Duration::from_millis(500),
        ..NatsConfig::new(format!("nats://{addr}"))
    };
    let started = Instant::now();
    let err = NatsSubscriber::connect(config)
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(err.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?} with a 500ms connect_timeout",
        started.elapsed()
    );
    hold.abort();
}

/// A server of the list that accepts connections and never answers (a hung node) costs
/// one `connect_timeout` per attempt, not every attempt: connecting finds the server that
/// answers, and when the connections are cut, both of the subscriber's connections (the
/// delivery connection and async-nats's) reconnect to it and delivery goes on.
#[tokio::test]
async fn a_hung_server_in_the_list_is_skipped_when_connecting_and_reconnecting() {
    let Some(url) = url() else { return };
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let hung_addr = hung.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket); // accepted, never answered
        }
    });
    let proxy = tidemill_testkit::fault_proxy::FaultProxy::start(common::host_port(&url))
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let mut config = test_config(&format!("nats://{hung_addr},nats://{}", proxy.addr()));
    config.connect_timeout = Duration::from_secs(1);
    config.ignore_discovered_servers = true;
    let topic = unique_topic("hung_server");
    let publisher = ok(
        NatsPublisher::connect(test_config(&url)).await,
        "publisher (direct)",
    );
    // Whichever server each connection tries first, it gets there.
    let subscriber = ok(NatsSubscriber::connect(config).await, "subscriber");
    let mut stream = ok(
        subscriber
            .subscribe(&topic, SubscribeOptions::group("hung"))
            .await,
        "subscribe",
    );
    ok(
        publisher.publish_one(&topic, Message::new("before")).await,
        "publish",
    );
    let d = next(&mut stream, "the message before the cut").await;
    ok(d.ack().await, "ack");
    for round in 0..3 {
        let before = subscriber.delivery_connects();
        proxy.cut();
        common::wait_deliveries_reconnected(&subscriber, before).await;
        let body = format!("after cut {round}");
        ok(
            publisher
                .publish_one(&topic, Message::new(body.clone()))
                .await,
            "publish",
        );
        let d = next(&mut stream, &body).await;
        assert_eq!(&d.message().payload()[..], body.as_bytes());
        ok(d.ack().await, "ack");
    }
    drop(stream);
    ok(subscriber.close().await, "close");
    ok(publisher.close().await, "close");
    hold.abort();
    delete_streams(&url, &[topic]).await;
}

/// A stream deleted under a running publisher is re-created by its next publish: the
/// publisher first tries the same stream again (in a cluster, "no responders" is most
/// often a leader election), then, after `request_timeout`, looks it up and creates it.
#[tokio::test]
async fn a_deleted_stream_is_re_created_by_the_next_publish() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.request_timeout = Duration::from_secs(2);
    let topic = unique_topic("deleted_stream");
    let p = ok(NatsPublisher::connect(config).await, "publisher");
    ok(
        p.publish_one(&topic, Message::new("first")).await,
        "publish",
    );
    let js = async_nats::jetstream::new(p.client().clone());
    js.delete_stream(&topic)
        .await
        .unwrap_or_else(|e| panic!("delete the stream: {e}"));
    let started = Instant::now();
    ok(
        timeout(LIMIT, p.publish_one(&topic, Message::new("second")))
            .await
            .expect("publish within the limit"),
        "publish after the deletion",
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "re-created after request_timeout (2 s), took {took:?}"
    );
    let mut stream = js
        .get_stream(&topic)
        .await
        .unwrap_or_else(|e| panic!("the re-created stream: {e}"));
    let info = stream.info().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        info.state.messages, 1,
        "only the message after the deletion"
    );
    ok(p.close().await, "close");
    delete_streams(&url, &[topic]).await;
}

/// Invalid configuration is refused before connecting, naming the field.
#[tokio::test]
async fn invalid_configuration_is_refused_naming_the_field() {
    let mut config = NatsConfig::new("nats://127.0.0.1:4222");
    config.jetstream.publish_window = 0;
    let err = NatsPublisher::connect(config)
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("publish_window"), "{err}");
    let err = NatsSubscriber::connect(NatsConfig::new("nats://host:port"))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("url"), "{err}");
}

/// Invalid topics are refused with an error naming them, before anything is sent.
#[tokio::test]
async fn invalid_topics_are_refused() {
    let Some(url) = url() else { return };
    let (p, s) = pair(&test_config(&url)).await;
    for topic in ["has space", "orders.*", "a..b", ""] {
        let err = p
            .publish_one(topic, Message::new("x"))
            .await
            .expect_err("invalid topic");
        assert!(err.to_string().contains(&format!("`{topic}`")), "{err}");
        assert!(!err.is_transient(), "{err}");
        let err = s
            .subscribe(topic, SubscribeOptions::new())
            .await
            .expect_err("invalid topic");
        assert!(!err.is_transient(), "{err}");
    }
}

/// With `create_streams` off, a topic no stream captures is an error naming its subject;
/// a stream the user created (any name, any subjects) is found by subject and used.
#[tokio::test]
async fn streams_are_found_by_subject_and_created_only_when_allowed() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.jetstream.create_streams = false;
    let (p, s) = pair(&config).await;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let missing = format!("tmmissing{id}.orders");
    let err = p
        .publish_one(&missing, Message::new("x"))
        .await
        .expect_err("no stream");
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(err.to_string().contains("create_streams"), "{err}");
    assert!(!err.is_transient());
    let err = s
        .subscribe(&missing, SubscribeOptions::group("g"))
        .await
        .expect_err("no stream");
    assert!(err.to_string().contains(&missing), "{err}");

    // The user's own stream, capturing a wildcard.
    let raw = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(raw);
    let stream_name = format!("USER_{id}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("tmuser{id}.>")],
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let topic = format!("tmuser{id}.orders.eu");
    ok(
        s.initialize(&topic, &SubscribeOptions::group("billing"))
            .await,
        "initialize",
    );
    let consumer = ok(s.consumer_name(&topic, "billing").await, "consumer name");
    assert!(consumer.starts_with("billing_tmuser"), "{consumer}");
    ok(
        p.publish_one(&topic, Message::new("in the user's stream"))
            .await,
        "publish",
    );
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("billing"))
            .await,
        "subscribe",
    );
    let d = next(&mut stream, "the message").await;
    assert_eq!(d.message().payload().as_ref(), b"in the user's stream");
    ok(d.ack().await, "ack");
    let mut info = js
        .get_stream(&stream_name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let info = info.info().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.state.messages, 1, "stored in the user's stream");
    js.delete_stream(&stream_name)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// One shared stream for every topic (`jetstream.stream`): topics stay apart, each group
/// consumer is named after group and topic, and a message forwarded unchanged from one
/// topic to another is not taken for a duplicate.
#[tokio::test]
async fn a_shared_stream_holds_every_topic() {
    let Some(url) = url() else { return };
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let mut config = test_config(&url);
    config.subject_prefix = format!("tmshared{id}.");
    config.jetstream.stream = Some(format!("TM_SHARED_{id}"));
    let (p, s) = pair(&config).await;
    let (a, b) = ("orders".to_owned(), "payments.eu".to_owned());
    let mut sa = ok(
        s.subscribe(&a, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let mut sb = ok(
        s.subscribe(&b, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    assert_eq!(ok(s.consumer_name(&a, "g").await, "name"), "g_orders");
    ok(p.publish_one(&a, Message::new("to a")).await, "publish");
    ok(p.publish_one(&b, Message::new("to b")).await, "publish");
    let da = next(&mut sa, "a's message").await;
    let db = next(&mut sb, "b's message").await;
    assert_eq!(da.message().payload().as_ref(), b"to a");
    assert_eq!(db.message().payload().as_ref(), b"to b");
    let forwarded = da.message().clone();
    ok(da.ack().await, "ack");
    ok(db.ack().await, "ack");
    // Forwarded unchanged to another topic of the stream, a message is a new message there
    // (the stream's duplicate window spans all its subjects), uuid and all; sent to that
    // topic again, it is a retry, which the stream drops.
    ok(p.publish_one(&b, forwarded.clone()).await, "forward");
    let df = next(&mut sb, "the forwarded message").await;
    assert_eq!(df.message().uuid(), forwarded.uuid());
    assert_eq!(df.message().payload().as_ref(), b"to a");
    ok(df.ack().await, "ack");
    ok(p.publish_one(&b, forwarded).await, "retry");
    quiet(&mut sa, "topic a").await;
    quiet(&mut sb, "topic b").await;
    let raw = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = async_nats::jetstream::new(raw);
    let mut stream = js
        .get_stream(format!("TM_SHARED_{id}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let info = stream.info().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.config.subjects, vec![format!("tmshared{id}.>")]);
    assert_eq!(info.state.messages, 3);
    ok(s.close().await, "close");
    let _ = js.delete_stream(format!("TM_SHARED_{id}")).await;
}

/// A delivery held longer than `ack_wait` is not redelivered to another group member:
/// in-progress acks keep it.
#[tokio::test]
async fn a_long_handler_keeps_its_message() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.jetstream.ack_wait = Duration::from_secs(4);
    let topic = unique_topic("long_handler");
    let p = ok(NatsPublisher::connect(config.clone()).await, "publisher");
    let (s1, s2) = (
        ok(NatsSubscriber::connect(config.clone()).await, "s1"),
        ok(NatsSubscriber::connect(config.clone()).await, "s2"),
    );
    let group = SubscribeOptions::group("slow");
    let mut first = ok(s1.subscribe(&topic, group.clone()).await, "subscribe");
    ok(
        p.publish_one(&topic, Message::new("slow work")).await,
        "publish",
    );
    let held = next(&mut first, "the message").await;
    let mut second = ok(s2.subscribe(&topic, group).await, "subscribe");
    // Three times ack_wait: without in-progress acks it would be redelivered meanwhile.
    let hold = Duration::from_secs(12);
    if let Ok(Some(Ok(d))) = timeout(hold, second.next()).await {
        panic!(
            "redelivered while held: {:?} (attempt {:?})",
            d.message(),
            d.attempt()
        );
    }
    ok(held.ack().await, "ack");
    quiet(&mut second, "after the ack").await;
    delete_streams(&url, &[topic]).await;
}

/// Batches far larger than `max_ack_inflight`, from several tasks at once, go through
/// (the publisher bounds PubAcks in flight without deadlocking) and arrive complete.
#[tokio::test]
async fn large_concurrent_batches_do_not_deadlock() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.jetstream.max_ack_inflight = 64;
    config.jetstream.publish_window = 48;
    let topic = unique_topic("large_batches");
    let (p, s) = pair(&config).await;
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let batches: Vec<Vec<Message>> = (0..4)
        .map(|t| (0..500).map(|i| Message::new(format!("{t}-{i}"))).collect())
        .collect();
    let expected: HashSet<String> = batches
        .iter()
        .flatten()
        .map(|m| m.uuid().to_owned())
        .collect();
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let (p, topic) = (p.clone(), topic.clone());
            tokio::spawn(async move { p.publish(&topic, batch).await })
        })
        .collect();
    for t in tasks {
        match timeout(LIMIT, t).await {
            Err(_) => panic!("publishing did not finish within {LIMIT:?} (deadlock?)"),
            Ok(r) => ok(r.unwrap_or_else(|e| panic!("{e}")), "publish"),
        }
    }
    let mut got = HashSet::new();
    while got.len() < expected.len() {
        let d = next(&mut stream, "the batches").await;
        got.insert(d.message().uuid().to_owned());
        ok(d.ack().await, "ack");
    }
    assert_eq!(got, expected);
    delete_streams(&url, &[topic]).await;
}

/// Order per key: a nacked keyed message is handed out again before its successors, also
/// with a delay (the successors wait), with the attempt counting up.
#[tokio::test]
async fn a_nacked_keyed_message_comes_back_first_with_its_attempt() {
    let Some(url) = url() else { return };
    let config = test_config(&url);
    let topic = unique_topic("keyed_nack");
    let (p, s) = pair(&config).await;
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let (a1, a2, b1) = (
        Message::new("a1").with_key("a"),
        Message::new("a2").with_key("a"),
        Message::new("b1").with_key("b"),
    );
    ok(
        p.publish(&topic, vec![a1.clone(), a2.clone(), b1.clone()])
            .await,
        "publish",
    );
    let first = next(&mut stream, "a1").await;
    assert_eq!(first.message(), &a1);
    assert_eq!(first.attempt(), Some(1));
    // Another key is not held back.
    let other = next(&mut stream, "b1").await;
    assert_eq!(other.message(), &b1);
    ok(other.ack().await, "ack");
    let delay = Duration::from_millis(700);
    let nacked_at = Instant::now();
    ok(first.nack_with_delay(delay).await, "nack");
    let again = next(&mut stream, "a1 again").await;
    assert!(nacked_at.elapsed() + Duration::from_millis(50) >= delay);
    assert_eq!(again.message(), &a1, "a1 comes back before a2");
    assert_eq!(again.attempt(), Some(2));
    drop(again); // dropping nacks
    let third = next(&mut stream, "a1 a third time").await;
    assert_eq!(third.message(), &a1);
    assert_eq!(third.attempt(), Some(3));
    ok(third.ack().await, "ack");
    let last = next(&mut stream, "a2").await;
    assert_eq!(last.message(), &a2);
    ok(last.ack().await, "ack");
    delete_streams(&url, &[topic]).await;
}

/// When a group's subscription ends, what it had read ahead goes back at once (not after
/// `ack_wait`): the next member gets every message, including those held unacked at the
/// end (nacked after their stream ended: their naks wait until the ended subscription's
/// inbox is unsubscribed, or the server would redeliver them into its pull requests) and
/// keyed ones waiting for their key's turn.
#[tokio::test]
async fn an_ended_subscription_hands_back_what_it_read_ahead() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.jetstream.ack_wait = Duration::from_secs(300); // far beyond LIMIT
    let topic = unique_topic("read_ahead");
    let (p, s) = pair(&config).await;
    let group = SubscribeOptions::group("g");
    let mut first = ok(s.subscribe(&topic, group.clone()).await, "subscribe");
    let keyed = (0..25).map(|i| Message::new(format!("k{i}")).with_key("k"));
    let plain = (0..25).map(|i| Message::new(format!("m{i}")));
    let msgs: Vec<Message> = keyed.chain(plain).collect();
    ok(p.publish(&topic, msgs.clone()).await, "publish");
    let held = next(&mut first, "the first message").await;
    assert_eq!(held.message(), &msgs[0]);
    // The other keyed messages wait for their key's turn; the first without key comes out.
    let held_plain = next(&mut first, "the first message without key").await;
    assert_eq!(held_plain.message(), &msgs[25]);
    drop(first); // 48 messages read ahead or waiting, two held
    drop(held); // nacked
    drop(held_plain); // nacked
    let s2 = ok(NatsSubscriber::connect(config).await, "second subscriber");
    let mut second = ok(s2.subscribe(&topic, group).await, "subscribe");
    let mut got = HashSet::new();
    while got.len() < msgs.len() {
        let d = next(&mut second, "the handed-back messages").await;
        got.insert(d.message().uuid().to_owned());
        ok(d.ack().await, "ack");
    }
    delete_streams(&url, &[topic]).await;
}

/// Core NATS is at most once: a nacked message is not redelivered, and a message published
/// while nobody subscribes is gone.
#[tokio::test]
async fn core_nats_is_at_most_once() {
    let Some(url) = url() else { return };
    let config = NatsConfig {
        mode: NatsMode::Core,
        ..test_config(&url)
    };
    let topic = unique_topic("at_most_once");
    let (p, s) = pair(&config).await;
    ok(
        p.publish_one(&topic, Message::new("nobody listens")).await,
        "publish",
    );
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("g")).await,
        "subscribe",
    );
    let m = Message::new("once").with_metadata("k", "v");
    ok(p.publish_one(&topic, m.clone()).await, "publish");
    let d = next(&mut stream, "the message").await;
    assert_eq!(d.message(), &m);
    assert_eq!(d.attempt(), None);
    ok(d.nack().await, "nack");
    quiet(&mut stream, "after a nack in core NATS").await;
    ok(
        s.initialize(&topic, &SubscribeOptions::group("g")).await,
        "initialize",
    );
    assert!(s.consumer_name(&topic, "g").await.is_err());
}

/// Closing: the subscriber's streams end; publishing after close fails naming the topic;
/// subscribing after close fails.
#[tokio::test]
async fn closed_handles_refuse_work() {
    let Some(url) = url() else { return };
    for mode in [NatsMode::JetStream, NatsMode::Core] {
        let config = NatsConfig {
            mode,
            ..test_config(&url)
        };
        let topic = unique_topic("closed");
        let (p, s) = pair(&config).await;
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::new()).await,
            "subscribe",
        );
        ok(s.close().await, "close");
        ok(s.close().await, "close twice");
        assert!(timeout(LIMIT, stream.next())
            .await
            .is_ok_and(|d| d.is_none()));
        let err = s
            .subscribe(&topic, SubscribeOptions::new())
            .await
            .expect_err("closed");
        assert!(matches!(err, Error::SubscriberClosed { .. }), "{err}");
        ok(p.close().await, "close");
        let err = p
            .publish_one(&topic, Message::new("late"))
            .await
            .expect_err("closed");
        assert!(matches!(err, Error::PublisherClosed { .. }), "{err}");
        assert!(err.to_string().contains(&topic), "{err}");
        delete_streams(&url, &[topic]).await;
    }
}

/// A writer collecting log output, for checking what the logs say.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl Logs {
    /// Collects what this thread logs up to `level` until the guard is dropped (the tests'
    /// runtime runs on one thread).
    fn capture(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything logged so far.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Passwords, tokens and credentials never appear in errors, `Debug` output or logs
/// (URL userinfo included), whether connecting fails or works.
#[tokio::test]
async fn secrets_never_appear_in_errors_or_logs() {
    let Some(url) = url() else { return };
    let (logs, _guard) = Logs::capture(tracing::Level::TRACE);
    let secrets = ["hunter2", "pw-s3cret", "tok-s3cret", "SUASEEDS3CRET"];
    let creds = std::env::temp_dir().join(format!("tidemill-{}.creds", std::process::id()));
    std::fs::write(
        &creds,
        "-----BEGIN USER NKEY SEED-----\nSUASEEDS3CRET\n------END USER NKEY SEED------\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut errors = Vec::new();
    let unreachable = NatsConfig {
        connect_timeout: Duration::from_secs(2),
        password: Some("pw-s3cret".into()),
        user: Some("bob".into()),
        token: Some("tok-s3cret".into()),
        ..NatsConfig::new("nats://alice:hunter2@127.0.0.1:1")
    };
    errors.push(format!("{unreachable:?}"));
    errors.push(
        NatsPublisher::connect(unreachable.clone())
            .await
            .err()
            .expect("fails")
            .to_string(),
    );
    errors.push(
        NatsSubscriber::connect(unreachable)
            .await
            .err()
            .expect("fails")
            .to_string(),
    );
    let with_creds = NatsConfig {
        connect_timeout: Duration::from_secs(2),
        credentials_file: Some(creds.clone()),
        ..test_config(&url)
    };
    if let Err(e) = NatsSubscriber::connect(with_creds).await {
        errors.push(e.to_string());
    }
    // A server without authentication accepts (and ignores) the credentials in the URL.
    let host = common::host_port(&url);
    let config = test_config(&format!("nats://alice:hunter2@{host}"));
    let (p, s) = pair(&config).await;
    let topic = unique_topic("discreet");
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    ok(p.publish_one(&topic, Message::new("x")).await, "publish");
    ok(next(&mut stream, "the message").await.ack().await, "ack");
    ok(p.close().await, "close");
    ok(s.close().await, "close");
    let _ = std::fs::remove_file(&creds);
    let logged = logs.text();
    for secret in secrets {
        for e in &errors {
            assert!(!e.contains(secret), "{secret} in {e}");
        }
        assert!(!logged.contains(secret), "{secret} in the logs:\n{logged}");
    }
    assert!(
        errors.iter().any(|e| e.contains("***@127.0.0.1:1")),
        "{errors:?}"
    );
    delete_streams(&url, &[topic]).await;
}

/// `retain_for` creates the group's durable consumer, so a group subscribing later gets
/// what was published before, even on a stream that keeps messages only for existing
/// consumers; `publish_mandatory` fails with `Error::Unroutable` when no stream keeps the
/// message; core NATS promises neither.
#[tokio::test]
async fn retain_for_and_mandatory_publishes() {
    let Some(url) = url() else { return };
    let mut config = test_config(&url);
    config.jetstream.retention = tidemill_nats::Retention::Interest;
    let (p, s) = pair(&config).await;
    let topic = unique_topic("retained");
    let unkept = Message::new("nobody keeps this");
    let err = p
        .publish_mandatory(&topic, vec![unkept.clone()])
        .await
        .expect_err("an interest stream without consumers keeps nothing");
    assert!(matches!(err, Error::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains(unkept.uuid()), "{err}");
    ok(p.retain_for(&topic, "late").await, "retain_for");
    ok(p.retain_for(&topic, "late").await, "retain_for again");
    let kept = vec![Message::new("a"), Message::new("b")];
    ok(
        p.publish_mandatory(&topic, kept.clone()).await,
        "publish_mandatory",
    );
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::group("late")).await,
        "subscribe",
    );
    for want in &kept {
        let d = next(&mut stream, "a retained message").await;
        assert_eq!(d.message(), want);
        ok(d.ack().await, "ack");
    }

    let strict = NatsConfig {
        jetstream: tidemill_nats::JetStreamConfig {
            create_streams: false,
            ..config.jetstream.clone()
        },
        ..config.clone()
    };
    let sp = ok(NatsPublisher::connect(strict).await, "publisher");
    let err = sp
        .publish_mandatory(&unique_topic("nowhere"), vec![Message::new("x")])
        .await
        .expect_err("no stream");
    assert!(matches!(err, Error::Unroutable { .. }), "{err}");

    let core = NatsConfig {
        mode: NatsMode::Core,
        ..test_config(&url)
    };
    let cp = ok(NatsPublisher::connect(core).await, "core publisher");
    let err = cp
        .retain_for("anything", "g")
        .await
        .expect_err("core keeps nothing");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("core NATS"), "{err}");
    let err = cp
        .publish_mandatory("anything", vec![Message::new("x")])
        .await
        .expect_err("core cannot tell");
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    for c in [
        p.close().await,
        s.close().await,
        sp.close().await,
        cp.close().await,
    ] {
        ok(c, "close");
    }
    delete_streams(&url, &[topic]).await;
}

/// `nack_with_delay` holds back that message only: the server redelivers it no earlier
/// than the delay (JetStream's NAK with delay), while messages published after it are
/// delivered meanwhile; with order per key, its key's successors wait behind it.
#[tokio::test]
async fn a_delayed_nack_delays_only_its_message() {
    let Some(url) = url() else { return };
    for order_per_key in [false, true] {
        let mut config = test_config(&url);
        config.jetstream.order_per_key = order_per_key;
        let (p, s) = pair(&config).await;
        let topic = unique_topic("delayed_nack");
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::group("g")).await,
            "subscribe",
        );
        let first = Message::new("first").with_key("k1");
        ok(p.publish_one(&topic, first.clone()).await, "publish");
        let d = next(&mut stream, "the first message").await;
        assert_eq!(d.message(), &first);
        let delay = Duration::from_secs(2);
        let nacked = Instant::now();
        ok(d.nack_with_delay(delay).await, "nack_with_delay");
        let same_key = Message::new("same key").with_key("k1");
        let others: Vec<Message> = (0..5)
            .map(|i| Message::new(format!("other {i}")).with_key(format!("o{i}")))
            .collect();
        ok(p.publish_one(&topic, same_key.clone()).await, "publish");
        ok(p.publish(&topic, others.clone()).await, "publish");
        let mut seen_others = 0;
        let mut order = Vec::new();
        while order.len() < others.len() + 2 {
            let d = next(&mut stream, "the rest").await;
            let m = d.message().clone();
            if m == first {
                assert!(
                    nacked.elapsed() >= delay,
                    "redelivered after {:?}",
                    nacked.elapsed()
                );
                assert_eq!(seen_others, others.len(), "others flowed while it waited");
                assert_eq!(d.attempt(), Some(2));
            } else if m != same_key {
                seen_others += 1;
            }
            order.push(m);
            ok(d.ack().await, "ack");
        }
        if order_per_key {
            let pos = |m: &Message| order.iter().position(|o| o == m).unwrap();
            assert!(pos(&first) < pos(&same_key), "order per key kept");
        }
        ok(p.close().await, "close");
        ok(s.close().await, "close");
        delete_streams(&url, &[topic]).await;
    }
}

/// Handlers with state and extractors on a real broker: a `Json` payload is decoded and
/// the handler's typed output published encoded; a payload that does not decode fails
/// permanently before the handler runs and lands on the poison topic with the reason.
#[tokio::test]
async fn state_and_json_extractors_with_a_decode_failure_poisoned() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tidemill_core::extract::{Json, State};
    use tidemill_core::{HandlerResult, Router, RouterConfig};
    use tidemill_middleware::{headers, PoisonQueue};

    #[derive(serde::Deserialize)]
    struct Order {
        qty: u32,
    }
    #[derive(serde::Serialize)]
    struct Priced {
        cents: u32,
    }
    #[derive(Clone)]
    struct Prices {
        unit: u32,
        calls: Arc<AtomicU32>,
    }

    let Some(url) = url() else { return };
    let config = test_config(&url);
    let (p, s) = pair(&config).await;
    let (orders, priced, poison) = (
        unique_topic("extract_orders"),
        unique_topic("extract_priced"),
        unique_topic("extract_poison"),
    );
    let mut out = ok(
        s.subscribe(&priced, SubscribeOptions::group("check")).await,
        "subscribe output",
    );
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("price")
        .subscribe(s.clone(), &orders)
        .group("pricing")
        .publish(p.clone(), &priced)
        .state(Prices {
            unit: 250,
            calls: calls.clone(),
        })
        .layer(PoisonQueue::new(p.clone(), &poison))
        .handler(
            |State(prices): State<Prices>, Json(order): Json<Order>| async move {
                prices.calls.fetch_add(1, Ordering::SeqCst);
                HandlerResult::Ok(Json(Priced {
                    cents: prices.unit * order.qty,
                }))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    let r = router.clone();
    let run = tokio::spawn(async move { r.run().await });
    timeout(LIMIT, router.running()).await.expect("running");
    ok(
        p.publish(
            &orders,
            vec![
                Message::new(r#"{"qty":3}"#),
                Message::new("{not json").with_metadata("source", "legacy"),
            ],
        )
        .await,
        "publish",
    );
    let d = next(&mut out, "the priced order").await;
    assert_eq!(d.message().payload().as_ref(), br#"{"cents":750}"#);
    assert_eq!(
        d.message().metadata().get("content-type"),
        Some("application/json")
    );
    ok(d.ack().await, "ack");
    let mut poisoned = ok(
        s.subscribe(&poison, SubscribeOptions::group(poison.as_str()))
            .await,
        "subscribe poison",
    );
    let d = next(&mut poisoned, "the undecodable order").await;
    let md = d.message().metadata();
    assert_eq!(d.message().payload().as_ref(), b"{not json");
    assert_eq!(md.get("source"), Some("legacy"));
    assert_eq!(md.get(headers::POISON_HANDLER), Some("price"));
    assert!(
        md.get(headers::POISON_REASON)
            .is_some_and(|r| r.contains("Order") || r.contains("decode")),
        "reason names the decode failure: {md:?}"
    );
    ok(d.ack().await, "ack");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "not called for the bad one"
    );
    quiet(&mut out, "nothing else published").await;
    router.close().await.expect("closed");
    let _ = run.await;
    ok(s.close().await, "close");
    ok(p.close().await, "close");
    delete_streams(&url, &[orders, priced, poison]).await;
}
