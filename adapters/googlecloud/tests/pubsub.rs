//! Pub/Sub-specific behaviour against the emulator (`PUBSUB_EMULATOR_HOST`): messages from
//! other clients, the key on the wire, bad input, stopping a stream releases its messages,
//! subscriptions cleaned up, and recovery when the emulator's state is gone.
//!
//! Every test skips (passing, with a note) when `PUBSUB_EMULATOR_HOST` is unset.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
use google_cloud_pubsub::client::{Publisher as RawPublisher, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::Message as RawMessage;
use tidemill_core::{DeliveryStream, Error, Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::unique_topic;
use tokio::time::{timeout, Instant};

const PROJECT: &str = "tidemill-test";
/// Generous bound for anything that should happen (never reached when things work).
const LIMIT: Duration = Duration::from_secs(60);

fn emulator() -> Option<String> {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => Some(host),
        _ => {
            eprintln!("SKIP: PUBSUB_EMULATOR_HOST is not set (no emulator to test against)");
            None
        }
    }
}

async fn publisher(config: &GoogleCloudConfig) -> GoogleCloudPublisher {
    GoogleCloudPublisher::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting a publisher failed: {e}"))
}

async fn subscriber(config: &GoogleCloudConfig) -> GoogleCloudSubscriber {
    GoogleCloudSubscriber::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting a subscriber failed: {e}"))
}

async fn topic_admin(host: &str) -> TopicAdmin {
    TopicAdmin::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("topic admin: {e}"))
}

async fn subscription_admin(host: &str) -> SubscriptionAdmin {
    SubscriptionAdmin::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("subscription admin: {e}"))
}

fn path(topic: &str) -> String {
    format!("projects/{PROJECT}/topics/{topic}")
}

/// The subscriptions attached to `topic`.
async fn subscriptions_of(host: &str, topic: &str) -> Vec<String> {
    let admin = topic_admin(host).await;
    let resp = timeout(
        LIMIT,
        admin
            .list_topic_subscriptions()
            .set_topic(path(topic))
            .send(),
    )
    .await
    .expect("listing subscriptions timed out")
    .unwrap_or_else(|e| panic!("listing subscriptions failed: {e}"));
    resp.subscriptions
}

/// Receives (acking each) until `n` distinct uuids arrived; returns the messages.
async fn receive(stream: &mut DeliveryStream, n: usize, what: &str) -> Vec<Message> {
    let mut seen = HashSet::new();
    let mut got = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while seen.len() < n {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: only {} of {n} within {LIMIT:?}", seen.len()));
        match item {
            None => panic!("{what}: the stream ended after {} of {n}", seen.len()),
            Some(Err(e)) => eprintln!("{what}: stream error (continuing): {e}"),
            Some(Ok(d)) => {
                seen.insert(d.message().uuid().to_owned());
                got.push(d.message().clone());
                d.ack().await.unwrap_or_else(|e| panic!("{what}: ack: {e}"));
            }
        }
    }
    got
}

#[tokio::test]
async fn a_message_published_right_after_subscribe_returns_is_delivered() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let (p, s) = (publisher(&config).await, subscriber(&config).await);
    for options in [SubscribeOptions::group("fresh"), SubscribeOptions::new()] {
        // A brand-new topic: nothing exists before subscribe.
        let topic = unique_topic("right_after_subscribe");
        let mut stream = s.subscribe(&topic, options).await.unwrap();
        let msg = Message::new("first").with_metadata("k", "v");
        p.publish_one(&topic, msg.clone()).await.unwrap();
        let got = receive(&mut stream, 1, "right after subscribe").await;
        assert_eq!(got[0], msg);
    }
    s.close().await.unwrap();
    p.close().await.unwrap();
}

#[tokio::test]
async fn messages_from_other_clients_get_a_stable_uuid_and_their_attributes() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("foreign");
    let s = subscriber(&config).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();

    let raw = RawPublisher::builder(path(&topic))
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let payload: Vec<u8> = vec![0, 0xff, 0xfe, b'x'];
    let id = timeout(
        LIMIT,
        raw.publish(
            RawMessage::new()
                .set_data(payload.clone())
                .set_attributes([("source", "legacy"), ("trace", "abc")])
                .set_ordering_key("acct-7"),
        ),
    )
    .await
    .expect("raw publish timed out")
    .unwrap();

    // First delivery: nacked; the redelivery must carry the same uuid: the message id.
    let first = next(&mut stream).await;
    let uuid = first.message().uuid().to_owned();
    assert_eq!(uuid, id, "the message id is the uuid");
    let m = first.message();
    assert_eq!(m.payload().as_ref(), &payload[..]);
    assert_eq!(m.key_str(), Some("acct-7"), "the ordering key is the key");
    assert_eq!(m.metadata().get("source"), Some("legacy"));
    assert_eq!(m.metadata().get("trace"), Some("abc"));
    assert_eq!(m.metadata().len(), 2, "{:?}", m.metadata());
    first.nack().await.unwrap();
    let again = next(&mut stream).await;
    assert_eq!(again.message().uuid(), uuid, "the uuid is stable");
    again.ack().await.unwrap();
    s.close().await.unwrap();
}

async fn next(stream: &mut DeliveryStream) -> tidemill_core::Delivery {
    loop {
        match timeout(LIMIT, stream.next()).await {
            Err(_) => panic!("no delivery within {LIMIT:?}"),
            Ok(None) => panic!("the stream ended"),
            Ok(Some(Err(e))) => eprintln!("stream error (continuing): {e}"),
            Ok(Some(Ok(d))) => return d,
        }
    }
}

#[tokio::test]
async fn with_message_ordering_the_key_travels_as_the_ordering_key() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig {
        message_ordering: true,
        ..GoogleCloudConfig::emulator(PROJECT, &host)
    };
    let topic = unique_topic("ordering_key");
    let (p, s) = (publisher(&config).await, subscriber(&config).await);
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    // A raw subscription on the same topic shows what is on the wire.
    let raw_sub = format!("projects/{PROJECT}/subscriptions/{topic}.raw");
    timeout(
        LIMIT,
        subscription_admin(&host)
            .await
            .create_subscription()
            .set_name(&raw_sub)
            .set_topic(path(&topic))
            .set_ack_deadline_seconds(10)
            .send(),
    )
    .await
    .expect("create subscription timed out")
    .unwrap();

    let text = Message::new("a").with_key("customer-1");
    let binary = Message::new("b").with_key([0xffu8, 0x01]);
    p.publish(&topic, vec![text.clone(), binary.clone()])
        .await
        .unwrap();
    let mut got = receive(&mut stream, 2, "ordered").await;
    got.sort_by(|a, b| a.payload().cmp(b.payload()));
    assert_eq!(got, vec![text.clone(), binary.clone()]);

    let raw = google_cloud_pubsub::client::Subscriber::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let mut raw_stream = raw.subscribe(&raw_sub).build();
    let mut keys = Vec::new();
    for _ in 0..2 {
        let (m, h) = timeout(LIMIT, raw_stream.next())
            .await
            .expect("raw pull timed out")
            .expect("raw stream ended")
            .unwrap();
        keys.push((m.data.clone(), m.ordering_key.clone()));
        h.ack();
    }
    keys.sort();
    assert_eq!(
        keys,
        vec![
            (bytes::Bytes::from("a"), "customer-1".to_owned()),
            // Binary keys are ordered by their base64 form.
            (bytes::Bytes::from("b"), "/wE=".to_owned()),
        ]
    );
    drop(raw_stream);
    s.close().await.unwrap();
    p.close().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_fail_naming_the_limit_and_nothing_is_sent() {
    let Some(host) = emulator() else { return };
    let topic = unique_topic("oversized");
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let (p, s) = (publisher(&config).await, subscriber(&config).await);
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();

    let big = Message::new(vec![7u8; 10_000_001]);
    let err = p
        .publish(&topic, vec![Message::new("small"), big.clone()])
        .await
        .expect_err("a message over 10 MB must be refused");
    assert!(
        matches!(&err, Error::MessageTooLarge { limit: 10_000_000, uuid, .. } if uuid == big.uuid()),
        "{err:?}"
    );
    assert!(err.to_string().contains("10000000 bytes"), "{err}");
    assert!(err.to_string().contains(&topic), "{err}");
    assert!(!err.is_transient());

    // The batch was refused as a whole: the small message was not published either.
    let ok = Message::new("after");
    p.publish_one(&topic, ok.clone()).await.unwrap();
    let got = receive(&mut stream, 1, "after the refused batch").await;
    assert_eq!(got, vec![ok]);

    // A configured lower limit applies the same way.
    let strict = GoogleCloudConfig {
        max_message_bytes: 1_000,
        ..config.clone()
    };
    let p2 = publisher(&strict).await;
    let err = p2
        .publish_one(&topic, Message::new(vec![0u8; 2_000]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit of 1000 bytes"), "{err}");
    s.close().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_emulator_fails_within_the_connect_timeout_naming_the_address() {
    // Nothing listens on this port: connection refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // This one accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            held.push(c);
        }
    });
    for addr in [refused, silent_addr] {
        let config = GoogleCloudConfig {
            connect_timeout: Duration::from_secs(2),
            ..GoogleCloudConfig::emulator(PROJECT, &addr)
        };
        let started = Instant::now();
        let err = GoogleCloudPublisher::connect(config.clone())
            .await
            .expect_err("connecting to nothing must fail");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr), "{err}");
        assert!(err.is_transient());
        let err = GoogleCloudSubscriber::connect(config)
            .await
            .expect_err("connecting to nothing must fail");
        assert!(err.to_string().contains(&addr), "{err}");
        // Both attempts end in about 2 × connect_timeout; the bound only catches a hang.
        assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn malformed_configuration_is_refused_before_connecting() {
    let err = GoogleCloudPublisher::connect(GoogleCloudConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("project_id"), "{err}");
    let bad: GoogleCloudConfig = serde_json::from_str(
        r#"{"project_id": "tidemill-test", "emulator_host": "127.0.0.1:1", "max_lease_extension": "2s"}"#,
    )
    .unwrap();
    let err = GoogleCloudSubscriber::connect(bad).await.unwrap_err();
    assert!(err.to_string().contains("max_lease_extension"), "{err}");
}

#[tokio::test]
async fn missing_resources_are_errors_naming_them_when_creation_is_off() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig {
        create_topics: false,
        create_subscriptions: false,
        ..GoogleCloudConfig::emulator(PROJECT, &host)
    };
    let topic = unique_topic("no_create");
    let p = publisher(&config).await;
    let err = p.publish_one(&topic, Message::new("x")).await.unwrap_err();
    assert!(err.to_string().contains(&topic), "{err}");
    assert!(err.to_string().contains("create_topics"), "{err}");
    assert!(!err.is_transient());

    let s = subscriber(&config).await;
    let err = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&format!("{topic}.g")), "{err}");
    assert!(err.to_string().contains("create_subscriptions"), "{err}");
    let err = s
        .subscribe(&topic, SubscribeOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("create_subscriptions"), "{err}");

    // An existing subscription is used as is.
    let creating = GoogleCloudConfig::emulator(PROJECT, &host);
    subscriber(&creating)
        .await
        .initialize(&topic, &SubscribeOptions::group("g"))
        .await
        .unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let msg = Message::new("exists");
    p.publish_one(&topic, msg.clone()).await.unwrap();
    assert_eq!(receive(&mut stream, 1, "existing").await, vec![msg]);
}

#[tokio::test]
async fn publishing_after_close_fails_naming_the_topic() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let p = publisher(&config).await;
    let topic = unique_topic("closed");
    p.publish_one(&topic, Message::new("before")).await.unwrap();
    p.close().await.unwrap();
    p.close().await.unwrap(); // idempotent
    let err = p
        .publish_one(&topic, Message::new("after"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PublisherClosed { .. }), "{err:?}");
    assert!(err.to_string().contains(&topic), "{err}");
    let s = subscriber(&config).await;
    s.close().await.unwrap();
    let err = s
        .subscribe(&topic, SubscribeOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SubscriberClosed { .. }), "{err:?}");
}

/// Publishes `n` messages to a group, lets a first member take one and stop (by `stop`),
/// and checks that a second member gets all the others well before any lease the first
/// one might still hold could run out (`max_lease` is an hour).
async fn stopping_releases(host: &str, test: &str, stop: Stop) {
    let config = GoogleCloudConfig::emulator(PROJECT, host);
    let topic = unique_topic(test);
    let p = publisher(&config).await;
    let first = subscriber(&config).await;
    let token = tidemill_core::CancellationToken::new();
    let mut stream = first
        .subscribe(
            &topic,
            SubscribeOptions::group("g").with_cancellation(token.clone()),
        )
        .await
        .unwrap();
    let msgs: Vec<Message> = (0..20).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone()).await.unwrap();
    let taken = receive(&mut stream, 1, "first member").await;
    // Let the first member's pull read ahead whatever the emulator sends it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = match stop {
        Stop::Drop => {
            drop(stream);
            None
        }
        // The stream is kept (and never polled again): closing must release it anyway.
        Stop::Close => {
            first.close().await.unwrap();
            Some(stream)
        }
        Stop::Cancel => {
            token.cancel();
            Some(stream)
        }
    };
    let second = subscriber(&config).await;
    let mut other = second
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let rest: Vec<Message> = msgs
        .iter()
        .filter(|m| m.uuid() != taken[0].uuid())
        .cloned()
        .collect();
    let got = receive(&mut other, rest.len(), "second member").await;
    let got_ids: HashSet<&str> = got.iter().map(|m| m.uuid()).collect();
    for m in &rest {
        assert!(
            got_ids.contains(m.uuid()),
            "{m:?} never reached the second member"
        );
    }
    drop(kept);
    second.close().await.unwrap();
}

enum Stop {
    Drop,
    Close,
    Cancel,
}

#[tokio::test]
async fn dropping_a_stream_releases_what_it_pulled() {
    let Some(host) = emulator() else { return };
    stopping_releases(&host, "stop_drop", Stop::Drop).await;
}

#[tokio::test]
async fn closing_the_subscriber_releases_an_unread_stream() {
    let Some(host) = emulator() else { return };
    stopping_releases(&host, "stop_close", Stop::Close).await;
}

#[tokio::test]
async fn cancelling_a_subscription_releases_an_unread_stream() {
    let Some(host) = emulator() else { return };
    stopping_releases(&host, "stop_cancel", Stop::Cancel).await;
}

#[tokio::test]
async fn a_held_delivery_stays_valid_after_its_stream_ends() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("held");
    let p = publisher(&config).await;
    let s = subscriber(&config).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    p.publish_one(&topic, Message::new("held")).await.unwrap();
    let held = next(&mut stream).await;
    drop(stream);
    s.close().await.unwrap();
    // Settled after the stream is gone: the nack still reaches Pub/Sub.
    held.nack().await.unwrap();
    let s2 = subscriber(&config).await;
    let mut again = s2
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let got = receive(&mut again, 1, "after nack").await;
    assert_eq!(got[0].payload().as_ref(), b"held");
    s2.close().await.unwrap();
}

#[tokio::test]
async fn subscriptions_without_a_group_are_deleted_when_the_stream_ends() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("unique_cleanup");
    let s = subscriber(&config).await;
    let dropped = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let _closed = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let group = s
        .subscribe(&topic, SubscribeOptions::group("stays"))
        .await
        .unwrap();
    assert_eq!(subscriptions_of(&host, &topic).await.len(), 3);
    drop(dropped);
    // Deleted in the background: wait (bounded) for it.
    let deadline = Instant::now() + LIMIT;
    while subscriptions_of(&host, &topic).await.len() > 2 {
        assert!(
            Instant::now() < deadline,
            "the dropped stream's subscription is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.close().await.unwrap();
    // close() waits for the clean-up: only the group's subscription is left.
    assert_eq!(
        subscriptions_of(&host, &topic).await,
        vec![format!("projects/{PROJECT}/subscriptions/{topic}.stays")]
    );
    drop(group);
}

#[tokio::test]
async fn consumption_resumes_when_the_emulator_lost_its_state() {
    // An emulator restart drops every connection and forgets every topic and
    // subscription. Simulated without restarting the shared emulator: delete the topic and
    // subscription, then cut the connections through a fault proxy.
    let Some(host) = emulator() else { return };
    let proxy = FaultProxy::start(host.as_str()).await.unwrap();
    let config = GoogleCloudConfig::emulator(PROJECT, proxy.addr().to_string());
    let topic = unique_topic("state_lost");
    let (p, s) = (publisher(&config).await, subscriber(&config).await);
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let sub_name = s.subscription_name(&topic, "g").unwrap();
    let before = Message::new("before");
    p.publish_one(&topic, before.clone()).await.unwrap();
    assert_eq!(receive(&mut stream, 1, "before").await, vec![before]);

    let subs = subscription_admin(&host).await;
    subs.delete_subscription()
        .set_subscription(&sub_name)
        .send()
        .await
        .unwrap();
    topic_admin(&host)
        .await
        .delete_topic()
        .set_topic(path(&topic))
        .send()
        .await
        .unwrap();
    proxy.cut();

    // The stream reports the loss, creates topic and subscription again, and resumes.
    let deadline = Instant::now() + LIMIT;
    loop {
        let exists = subs
            .get_subscription()
            .set_subscription(&sub_name)
            .send()
            .await;
        if exists.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscription was not re-created"
        );
        // Keep the stream polled so errors are consumed.
        if let Ok(Some(Err(e))) = timeout(Duration::from_millis(100), stream.next()).await {
            eprintln!("reported while recovering: {e}");
        }
    }
    // The publisher re-creates the topic too (its cached handle now gets NOT_FOUND).
    let after = Message::new("after");
    p.publish_one(&topic, after.clone()).await.unwrap();
    assert_eq!(receive(&mut stream, 1, "after").await, vec![after]);
    s.close().await.unwrap();
    p.close().await.unwrap();
}
