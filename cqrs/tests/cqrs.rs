//! CQRS behaviour on the in-memory broker.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidemill_core::router::{BatchResult, BoxHandler, Router};
use tidemill_core::{
    is_permanent, permanent, BoxError, DeliveryStream, MemoryBroker, Message, Publisher,
    SubscribeOptions, Subscriber,
};
use tidemill_cqrs::{
    Command, CommandBus, CommandClient, CommandProcessor, Context, CqrsError, Event, EventBus,
    EventProcessor, TopicNaming, TypeHeader, UnknownTypePolicy, NAME_KEY,
};
use tidemill_middleware::request_reply::{ReplyErrorKind, RequesterConfig};
use tidemill_middleware::{headers, Backoff, DeadLetter, PoisonQueue, Retry};
use tokio::sync::mpsc;
use tower::{Layer, Service};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BookRoom {
    room: u32,
    guest: String,
}
impl Command for BookRoom {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RoomBooked {
    room: u32,
}
impl Event for RoomBooked {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RoomCleaned {
    room: u32,
}
impl Event for RoomCleaned {}

async fn start(router: &Router) {
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router runs");
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("within 10s")
        .expect("open")
}

/// Records each handler error as a `T` (made from the error and the delivery attempt), then
/// either acks the message ([`ErrorLog::swallowing`]) or passes the error on so the router
/// nacks it ([`ErrorLog::passing`]).
struct ErrorLog<T>(Arc<Mutex<Vec<T>>>, fn(&BoxError, u32) -> T, bool);

impl<T> Clone for ErrorLog<T> {
    fn clone(&self) -> Self {
        ErrorLog(self.0.clone(), self.1, self.2)
    }
}

impl ErrorLog<(bool, String)> {
    /// Records (permanent?, error) and acks the message, standing in for the poison-queue
    /// middleware so the decode errors can be inspected.
    fn swallowing() -> Self {
        ErrorLog(
            Arc::default(),
            |e, _| (is_permanent(e.as_ref()), e.to_string()),
            true,
        )
    }
}

impl ErrorLog<(String, u32)> {
    /// Records (error, delivery attempt) and passes the error on (the router then nacks).
    fn passing() -> Self {
        ErrorLog(Arc::default(), |e, attempt| (e.to_string(), attempt), false)
    }
}

impl<T: Send + 'static> Layer<BoxHandler> for ErrorLog<T> {
    type Service = Logged<T>;
    fn layer(&self, inner: BoxHandler) -> Logged<T> {
        Logged(self.clone(), inner)
    }
}

struct Logged<T>(ErrorLog<T>, BoxHandler);

impl<T: Send + 'static> Service<Message> for Logged<T> {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.1.poll_ready(cx)
    }
    fn call(&mut self, m: Message) -> Self::Future {
        let ErrorLog(log, record, swallow) = self.0.clone();
        let attempt = m.context().and_then(|c| c.attempt()).unwrap_or(0);
        let fut = self.1.call(m);
        Box::pin(async move {
            match fut.await {
                Err(e) => {
                    log.lock().push(record(&e, attempt));
                    if swallow {
                        Ok(Vec::new())
                    } else {
                        Err(e)
                    }
                }
                ok => ok,
            }
        })
    }
}

/// A handler that only counts its calls in `count`.
fn counting<T>(
    count: &Arc<Mutex<u32>>,
) -> impl Fn(T, Context) -> futures::future::Ready<Result<(), BoxError>> + Send + Sync + 'static {
    let count = count.clone();
    move |_, _| {
        *count.lock() += 1;
        futures::future::ready(Ok(()))
    }
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_sent_command_reaches_its_one_handler_with_metadata() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands
        .handle(move |cmd: BookRoom, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((cmd, ctx.message().clone())).unwrap();
                Ok(())
            }
        })
        .unwrap();
    let err = commands
        .handle(|_: BookRoom, _| async { Ok(()) })
        .err()
        .expect("a second handler for BookRoom is rejected");
    assert!(
        matches!(err, CqrsError::DuplicateCommandHandler(ref n) if n == "BookRoom"),
        "{err}"
    );
    commands.add_to(&router).await.unwrap();
    start(&router).await;

    let bus = CommandBus::new(broker.publisher()).on_send(|m| {
        m.metadata_mut().set("desk", "front");
    });
    assert_eq!(bus.topic_of::<BookRoom>(), "commands.BookRoom");
    let cmd = BookRoom {
        room: 101,
        guest: "Ada".into(),
    };
    bus.send(&cmd).await.unwrap();
    let (got, msg) = recv(&mut rx).await;
    assert_eq!(got, cmd);
    assert_eq!(msg.metadata().get(NAME_KEY), Some("BookRoom"));
    assert_eq!(msg.metadata().get("content-type"), Some("application/json"));
    assert_eq!(
        msg.metadata().get("desk"),
        Some("front"),
        "the on_send hook ran"
    );
    let ctx = msg.context().unwrap();
    assert_eq!(ctx.handler().topic, "commands.BookRoom");
    assert_eq!(ctx.handler().group.as_deref(), Some("BookRoom-handler"));
    router.close().await.unwrap();
}

#[tokio::test]
async fn every_event_handler_gets_every_event() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut events = EventProcessor::new(broker.subscriber());
    for name in ["invoice", "notify"] {
        let tx = tx.clone();
        events
            .handle(name, move |e: RoomBooked, _ctx: Context| {
                let tx = tx.clone();
                async move {
                    tx.send((name, e.room)).unwrap();
                    Ok(())
                }
            })
            .unwrap();
    }
    assert!(matches!(
        events.handle("invoice", |_: RoomBooked, _| async { Ok(()) }),
        Err(CqrsError::DuplicateHandlerName(_))
    ));
    events.add_to(&router).await.unwrap();
    start(&router).await;
    let bus = EventBus::new(broker.publisher());
    bus.publish(&RoomBooked { room: 1 }).await.unwrap();
    bus.publish(&RoomBooked { room: 2 }).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut rx).await);
    }
    got.sort();
    assert_eq!(
        got,
        vec![("invoice", 1), ("invoice", 2), ("notify", 1), ("notify", 2)]
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn an_event_group_shares_one_subscription_and_keeps_order() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let one_topic = TopicNaming::new(|_| "events.rooms".to_owned());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut events = EventProcessor::new(broker.subscriber()).with_topic_naming(one_topic.clone());
    let (s1, s2) = (seen.clone(), seen.clone());
    events
        .group("housekeeping")
        .handle(move |e: RoomBooked, _| {
            let s = s1.clone();
            async move {
                s.lock().push(format!("booked {}", e.room));
                Ok(())
            }
        })
        .unwrap()
        .handle(move |e: RoomCleaned, _| {
            let s = s2.clone();
            async move {
                s.lock().push(format!("cleaned {}", e.room));
                Ok(())
            }
        })
        .unwrap()
        .done()
        .unwrap();
    events.add_to(&router).await.unwrap();
    assert_eq!(
        router.handlers(),
        vec!["housekeeping".to_owned()],
        "one subscription"
    );
    start(&router).await;
    let bus = EventBus::new(broker.publisher()).with_topic_naming(one_topic);
    bus.publish(&RoomBooked { room: 7 }).await.unwrap();
    bus.publish(&RoomCleaned { room: 7 }).await.unwrap();
    bus.publish(&RoomBooked { room: 8 }).await.unwrap();
    wait_for("three events", || seen.lock().len() == 3).await;
    assert_eq!(*seen.lock(), vec!["booked 7", "cleaned 7", "booked 8"]);
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_group_over_two_topics_is_rejected() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let mut events = EventProcessor::new(broker.subscriber());
    events
        .group("split")
        .handle(|_: RoomBooked, _| async { Ok(()) })
        .unwrap()
        .handle(|_: RoomCleaned, _| async { Ok(()) })
        .unwrap()
        .done()
        .unwrap();
    let err = events.add_to(&router).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("events.RoomBooked") && text.contains("events.RoomCleaned"),
        "{text}"
    );
}

#[tokio::test]
async fn undecodable_and_unnamed_messages_fail_permanently_with_the_reason() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let errors = ErrorLog::swallowing();
    router.layer(errors.clone());
    let handled = Arc::new(Mutex::new(0));
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands.handle(counting::<BookRoom>(&handled)).unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    let p = broker.publisher();
    p.publish_one(
        "commands.BookRoom",
        Message::new("{not json").with_metadata(NAME_KEY, "BookRoom"),
    )
    .await
    .unwrap();
    p.publish_one("commands.BookRoom", Message::with_uuid("no-name", "{}"))
        .await
        .unwrap();
    wait_for("two errors", || errors.0.lock().len() == 2).await;
    let errs = errors.0.lock().clone();
    assert!(errs.iter().all(|(permanent, _)| *permanent), "{errs:?}");
    assert!(
        errs[0].1.contains("cannot decode command `BookRoom`")
            && errs[0].1.contains("commands.BookRoom"),
        "{}",
        errs[0].1
    );
    assert!(
        errs[1].1.contains("no-name") && errs[1].1.contains(NAME_KEY),
        "{}",
        errs[1].1
    );
    assert_eq!(*handled.lock(), 0, "the handler never saw them");
    wait_for("both acked", || {
        broker.group_backlog("commands.BookRoom", "BookRoom-handler") == Some(0)
    })
    .await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn unknown_types_follow_the_policy() {
    for policy in [UnknownTypePolicy::AckAndCount, UnknownTypePolicy::Reject] {
        let broker = MemoryBroker::new();
        let router = Router::new();
        let errors = ErrorLog::swallowing();
        router.layer(errors.clone());
        let shared = TopicNaming::new(|_| "commands".to_owned());
        let mut commands = CommandProcessor::new(broker.subscriber())
            .with_topic_naming(shared)
            .with_unknown_type_policy(policy);
        commands.handle(|_: BookRoom, _| async { Ok(()) }).unwrap();
        commands.add_to(&router).await.unwrap();
        start(&router).await;
        broker
            .publisher()
            .publish_one(
                "commands",
                Message::new("{}").with_metadata(NAME_KEY, "Teleport"),
            )
            .await
            .unwrap();
        match policy {
            UnknownTypePolicy::AckAndCount => {
                wait_for("counted", || commands.unknown_count() == 1).await;
                assert!(errors.0.lock().is_empty());
            }
            UnknownTypePolicy::Reject => {
                wait_for("rejected", || errors.0.lock().len() == 1).await;
                let (permanent, text) = errors.0.lock()[0].clone();
                assert!(permanent);
                assert!(text.contains("no handler for command `Teleport`"), "{text}");
                assert_eq!(commands.unknown_count(), 0);
            }
        }
        router.close().await.unwrap();
    }
}

#[tokio::test]
async fn handler_errors_nack_and_the_command_is_retried() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands
        .handle(move |cmd: BookRoom, ctx: Context| {
            let tx = tx.clone();
            async move {
                let attempt = ctx.attempt().unwrap_or(0);
                tx.send((cmd.room, attempt)).unwrap();
                if attempt < 2 {
                    return Err("room service unavailable".into());
                }
                Ok(())
            }
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    CommandBus::new(broker.publisher())
        .send(&BookRoom {
            room: 5,
            guest: "Bo".into(),
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, (5, 1));
    assert_eq!(recv(&mut rx).await, (5, 2));
    router.close().await.unwrap();
}

#[cfg(feature = "protobuf")]
#[tokio::test]
async fn protobuf_round_trip() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Checkout {
        #[prost(uint32, tag = "1")]
        room: u32,
    }
    impl Command for Checkout {}

    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut commands =
        CommandProcessor::new(broker.subscriber()).with_marshaler(tidemill_cqrs::Protobuf);
    commands
        .handle(move |c: Checkout, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((
                    c,
                    ctx.message()
                        .metadata()
                        .get("content-type")
                        .map(str::to_owned),
                ))
                .unwrap();
                Ok(())
            }
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    CommandBus::new(broker.publisher())
        .with_marshaler(tidemill_cqrs::Protobuf)
        .send(&Checkout { room: 9 })
        .await
        .unwrap();
    let (got, ct) = recv(&mut rx).await;
    assert_eq!(got, Checkout { room: 9 });
    assert_eq!(ct.as_deref(), Some("application/x-protobuf"));
    router.close().await.unwrap();
}

#[cfg(feature = "protobuf")]
#[tokio::test]
async fn protobuf_decode_failures_go_to_the_poison_topic() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Checkout {
        #[prost(uint32, tag = "1")]
        room: u32,
    }
    impl Command for Checkout {}

    let broker = MemoryBroker::new();
    let router = Router::new();
    router.layer(PoisonQueue::new(broker.publisher(), "poison"));
    let mut poisoned = subscribe(&broker, "poison").await;
    let mut commands =
        CommandProcessor::new(broker.subscriber()).with_marshaler(tidemill_cqrs::Protobuf);
    commands.handle(|_: Checkout, _| async { Ok(()) }).unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    // Field 1 with a varint that never ends.
    broker
        .publisher()
        .publish_one(
            "commands.Checkout",
            Message::new(&b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..])
                .with_metadata(NAME_KEY, "Checkout"),
        )
        .await
        .unwrap();
    let msg = next(&mut poisoned).await;
    assert_eq!(
        msg.payload().as_ref(),
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
    );
    let reason = msg.metadata().get(headers::POISON_REASON).unwrap();
    assert!(
        reason.contains("cannot decode command `Checkout`"),
        "{reason}"
    );
    router.close().await.unwrap();
}

// ---- naming ----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CancelBooking {
    booking: String,
}
impl Command for CancelBooking {
    fn name() -> std::borrow::Cow<'static, str> {
        "booking.cancel".into()
    }
}

#[tokio::test]
async fn overridden_names_and_topic_naming_decide_the_topic() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let naming = TopicNaming::new(|name| format!("hotel.{name}"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut commands = CommandProcessor::new(broker.subscriber()).with_topic_naming(naming.clone());
    commands
        .handle(move |c: CancelBooking, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((c, ctx.message().clone())).unwrap();
                Ok(())
            }
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    assert_eq!(router.handlers(), vec!["booking.cancel-handler".to_owned()]);
    start(&router).await;
    let bus = CommandBus::new(broker.publisher()).with_topic_naming(naming);
    assert_eq!(bus.topic_of::<CancelBooking>(), "hotel.booking.cancel");
    bus.send(&CancelBooking {
        booking: "b-1".into(),
    })
    .await
    .unwrap();
    let (got, msg) = recv(&mut rx).await;
    assert_eq!(got.booking, "b-1");
    assert_eq!(msg.metadata().get(NAME_KEY), Some("booking.cancel"));
    assert_eq!(
        msg.context().unwrap().handler().topic,
        "hotel.booking.cancel"
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn the_event_bus_hook_and_group_naming_apply() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut events =
        EventProcessor::new(broker.subscriber()).with_group_naming(|h| format!("svc-{h}"));
    events
        .handle("audit", move |e: RoomBooked, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((e, ctx.message().clone())).unwrap();
                Ok(())
            }
        })
        .unwrap();
    events.add_to(&router).await.unwrap();
    start(&router).await;
    let bus = EventBus::new(broker.publisher()).on_publish(|m| {
        m.set_key(Some("room-3".into()));
        m.metadata_mut().set("source", "desk");
    });
    assert_eq!(bus.topic_of::<RoomBooked>(), "events.RoomBooked");
    bus.publish(&RoomBooked { room: 3 }).await.unwrap();
    let (got, msg) = recv(&mut rx).await;
    assert_eq!(got, RoomBooked { room: 3 });
    assert_eq!(msg.metadata().get("source"), Some("desk"));
    assert_eq!(msg.key().map(|k| k.as_ref()), Some(&b"room-3"[..]));
    assert_eq!(msg.metadata().get(NAME_KEY), Some("RoomBooked"));
    assert_eq!(
        msg.context().unwrap().handler().group.as_deref(),
        Some("svc-audit")
    );
    router.close().await.unwrap();
}

// ---- event groups and unknown types ----------------------------------------------------

#[tokio::test]
async fn an_event_group_applies_the_unknown_type_policy() {
    for policy in [UnknownTypePolicy::AckAndCount, UnknownTypePolicy::Reject] {
        let broker = MemoryBroker::new();
        let router = Router::new();
        let errors = ErrorLog::swallowing();
        router.layer(errors.clone());
        let one_topic = TopicNaming::new(|_| "events.rooms".to_owned());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut events = EventProcessor::new(broker.subscriber())
            .with_topic_naming(one_topic.clone())
            .with_unknown_type_policy(policy);
        events
            .group("rooms")
            .handle(move |e: RoomBooked, _| {
                let s = s.clone();
                async move {
                    s.lock().push(e.room);
                    Ok(())
                }
            })
            .unwrap()
            .done()
            .unwrap();
        events.add_to(&router).await.unwrap();
        start(&router).await;
        let bus = EventBus::new(broker.publisher()).with_topic_naming(one_topic);
        bus.publish(&RoomCleaned { room: 1 }).await.unwrap();
        bus.publish(&RoomBooked { room: 2 }).await.unwrap();
        wait_for("the known event", || seen.lock().len() == 1).await;
        match policy {
            UnknownTypePolicy::AckAndCount => {
                assert_eq!(events.unknown_count(), 1);
                assert!(errors.0.lock().is_empty());
            }
            UnknownTypePolicy::Reject => {
                assert_eq!(events.unknown_count(), 0);
                let errs = errors.0.lock().clone();
                assert_eq!(errs.len(), 1, "{errs:?}");
                assert!(errs[0].0, "permanent");
                assert!(
                    errs[0].1.contains("no handler for event `RoomCleaned`"),
                    "{}",
                    errs[0].1
                );
            }
        }
        assert_eq!(*seen.lock(), vec![2]);
        router.close().await.unwrap();
    }
}

// ---- poison path -----------------------------------------------------------------------

async fn subscribe(broker: &MemoryBroker, topic: &str) -> DeliveryStream {
    broker
        .subscriber()
        .subscribe(topic, SubscribeOptions::new())
        .await
        .unwrap()
}

async fn next(stream: &mut DeliveryStream) -> Message {
    let delivery = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("within 10s")
        .expect("open")
        .expect("delivery");
    let msg = delivery.message().clone();
    delivery.ack().await.unwrap();
    msg
}

#[tokio::test]
async fn undecodable_commands_and_events_land_on_the_poison_topic_intact() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let poison = PoisonQueue::new(broker.publisher(), "poison");
    router.layer(poison.clone());
    let mut poisoned = subscribe(&broker, "poison").await;
    let handled = Arc::new(Mutex::new(0));
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands.handle(counting::<BookRoom>(&handled)).unwrap();
    commands.add_to(&router).await.unwrap();
    let mut events = EventProcessor::new(broker.subscriber());
    events
        .handle("invoice", counting::<RoomBooked>(&handled))
        .unwrap();
    events.add_to(&router).await.unwrap();
    start(&router).await;

    let p = broker.publisher();
    p.publish_one(
        "commands.BookRoom",
        Message::with_uuid("bad-cmd", r#"{"room":"one hundred"}"#)
            .with_metadata(NAME_KEY, "BookRoom")
            .with_metadata("trace", "t-1"),
    )
    .await
    .unwrap();
    p.publish_one(
        "events.RoomBooked",
        Message::with_uuid("bad-evt", "\u{0}\u{1}binary").with_metadata(NAME_KEY, "RoomBooked"),
    )
    .await
    .unwrap();

    let mut got = [next(&mut poisoned).await, next(&mut poisoned).await];
    got.sort_by(|a, b| a.uuid().cmp(b.uuid()));
    let (cmd, evt) = (&got[0], &got[1]);

    assert_eq!(cmd.uuid(), "bad-cmd");
    assert_eq!(cmd.payload().as_ref(), br#"{"room":"one hundred"}"#);
    assert_eq!(cmd.metadata().get(NAME_KEY), Some("BookRoom"));
    assert_eq!(cmd.metadata().get("trace"), Some("t-1"));
    let reason = cmd.metadata().get(headers::POISON_REASON).unwrap();
    assert!(
        reason.contains(
            "cannot decode command `BookRoom` from message bad-cmd on topic `commands.BookRoom`"
        ) && reason.contains("invalid type"),
        "{reason}"
    );
    assert_eq!(
        cmd.metadata().get(headers::POISON_HANDLER),
        Some("BookRoom-handler")
    );
    assert_eq!(
        cmd.metadata().get(headers::POISON_TOPIC),
        Some("commands.BookRoom")
    );

    assert_eq!(evt.uuid(), "bad-evt");
    assert_eq!(evt.payload().as_ref(), b"\x00\x01binary");
    let reason = evt.metadata().get(headers::POISON_REASON).unwrap();
    assert!(
        reason.contains("cannot decode event `RoomBooked` from message bad-evt"),
        "{reason}"
    );
    assert_eq!(evt.metadata().get(headers::POISON_HANDLER), Some("invoice"));

    assert_eq!(poison.poisoned(), 2);
    assert_eq!(*handled.lock(), 0);
    wait_for("both acked after poisoning", || {
        broker.group_backlog("commands.BookRoom", "BookRoom-handler") == Some(0)
            && broker.group_backlog("events.RoomBooked", "invoice") == Some(0)
    })
    .await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn without_a_poison_layer_an_undecodable_command_is_nacked_not_dropped() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let errors = ErrorLog::passing();
    router.layer(errors.clone());
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands.handle(|_: BookRoom, _| async { Ok(()) }).unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    broker
        .publisher()
        .publish_one(
            "commands.BookRoom",
            Message::new("not json").with_metadata(NAME_KEY, "BookRoom"),
        )
        .await
        .unwrap();
    wait_for("redelivered after the nack", || errors.0.lock().len() >= 2).await;
    let errs = errors.0.lock().clone();
    assert_eq!(
        (errs[0].1, errs[1].1),
        (1, 2),
        "the same message, redelivered"
    );
    assert!(
        errs.iter()
            .all(|(e, _)| e.contains("cannot decode command `BookRoom`")),
        "{errs:?}"
    );
    assert_ne!(
        broker.group_backlog("commands.BookRoom", "BookRoom-handler"),
        Some(0),
        "still pending: never silently dropped"
    );
    router.close().await.unwrap();
}

// ---- send and wait ---------------------------------------------------------------------

async fn booking_service(broker: &MemoryBroker, router: &Router) -> Arc<Mutex<Vec<u32>>> {
    let booked = Arc::new(Mutex::new(Vec::new()));
    let b = booked.clone();
    let mut commands = CommandProcessor::new(broker.subscriber()).with_replies(broker.publisher());
    commands
        .handle(move |cmd: BookRoom, _| {
            let b = b.clone();
            async move {
                if cmd.room == 13 {
                    return Err(permanent(format!("room {} does not exist", cmd.room)));
                }
                if cmd.guest.is_empty() {
                    return Err("front desk unreachable".into());
                }
                b.lock().push(cmd.room);
                Ok(())
            }
        })
        .unwrap();
    commands.add_to(router).await.unwrap();
    booked
}

async fn client(broker: &MemoryBroker) -> CommandClient {
    CommandBus::new(broker.publisher())
        .connect_client(broker.subscriber(), RequesterConfig::default())
        .await
        .unwrap()
}

fn book(room: u32, guest: &str) -> BookRoom {
    BookRoom {
        room,
        guest: guest.into(),
    }
}

#[tokio::test]
async fn send_and_wait_returns_once_the_handler_succeeded() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let booked = booking_service(&broker, &router).await;
    start(&router).await;
    let client = client(&broker).await;
    client.send_and_wait(&book(101, "Ada"), WAIT).await.unwrap();
    assert_eq!(
        *booked.lock(),
        vec![101],
        "handled before the call returned"
    );
    // The same handler serves plain sends.
    client.send(&book(102, "Bo")).await.unwrap();
    wait_for("plain send handled", || booked.lock().len() == 2).await;
    assert_eq!(*booked.lock(), vec![101, 102]);
    assert_eq!(client.requester().unknown_replies(), 0);
    wait_for("acked", || {
        broker.group_backlog("commands.BookRoom", "BookRoom-handler") == Some(0)
    })
    .await;
    client.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn send_and_wait_returns_the_handlers_error_not_a_timeout() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let booked = booking_service(&broker, &router).await;
    start(&router).await;
    let client = client(&broker).await;
    let started = std::time::Instant::now();
    let err = client
        .send_and_wait(&book(13, "Ada"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered, not timed out"
    );
    match &err {
        CqrsError::CommandFailed {
            name,
            topic,
            kind,
            message,
        } => {
            assert_eq!(name, "BookRoom");
            assert_eq!(topic, "commands.BookRoom");
            assert_eq!(*kind, ReplyErrorKind::Permanent);
            assert!(message.contains("room 13 does not exist"), "{message}");
        }
        other => panic!("expected CommandFailed, got {other}"),
    }
    assert!(err.is_permanent());

    let err = client
        .send_and_wait(&book(7, ""), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CqrsError::CommandFailed { kind: ReplyErrorKind::Failed, message, .. }
            if message.contains("front desk unreachable")),
        "{err}"
    );
    assert!(!err.is_permanent());
    assert!(booked.lock().is_empty());
    // The failed commands were answered, so they are acked, not redelivered.
    wait_for("acked", || {
        broker.group_backlog("commands.BookRoom", "BookRoom-handler") == Some(0)
    })
    .await;
    client.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn send_and_wait_reports_an_undecodable_command_as_a_permanent_failure() {
    #[derive(Serialize, Deserialize)]
    struct WrongShape {
        room: String,
    }
    impl Command for WrongShape {
        fn name() -> std::borrow::Cow<'static, str> {
            "BookRoom".into()
        }
    }
    let broker = MemoryBroker::new();
    let router = Router::new();
    let booked = booking_service(&broker, &router).await;
    start(&router).await;
    let client = CommandBus::new(broker.publisher())
        .connect_client(broker.subscriber(), RequesterConfig::default())
        .await
        .unwrap();
    let err = client
        .send_and_wait(
            &WrongShape {
                room: "lobby".into(),
            },
            WAIT,
        )
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string().contains("cannot decode command `BookRoom`"),
        "{err}"
    );
    assert!(booked.lock().is_empty());
    client.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn send_and_wait_times_out_when_nobody_answers() {
    let broker = MemoryBroker::new();
    // A processor without replies handles the command but cannot answer.
    let router = Router::new();
    let handled = Arc::new(Mutex::new(0));
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands.handle(counting::<BookRoom>(&handled)).unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    let client = client(&broker).await;
    let err = client
        .send_and_wait(&book(1, "Ada"), Duration::from_millis(300))
        .await
        .unwrap_err();
    match &err {
        CqrsError::NoReply {
            name,
            topic,
            timeout,
        } => {
            assert_eq!(name, "BookRoom");
            assert_eq!(topic, "commands.BookRoom");
            assert_eq!(*timeout, Duration::from_millis(300));
        }
        other => panic!("expected NoReply, got {other}"),
    }
    assert!(err.to_string().contains("with_replies"), "{err}");
    wait_for("handled anyway", || *handled.lock() == 1).await;
    // A command nobody consumes times out too.
    #[derive(Serialize, Deserialize)]
    struct Nobody;
    impl Command for Nobody {}
    let err = client
        .send_and_wait(&Nobody, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, CqrsError::NoReply { .. }), "{err}");
    client.close().await;
    let err = client
        .send_and_wait(&book(2, "Bo"), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, CqrsError::Request { .. }), "{err}");
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_processor_layer_retries_before_the_reply_is_sent() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let attempts = Arc::new(Mutex::new(0u32));
    let a = attempts.clone();
    let mut commands = CommandProcessor::new(broker.subscriber()).with_replies(broker.publisher());
    commands.layer(
        Retry::new()
            .max_attempts(3)
            .backoff(Backoff::new(Duration::from_millis(1))),
    );
    commands
        .handle(move |_: BookRoom, _| {
            let a = a.clone();
            async move {
                let n = {
                    let mut n = a.lock();
                    *n += 1;
                    *n
                };
                if n % 2 == 1 {
                    return Err("billing busy".into());
                }
                Ok(())
            }
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    let client = client(&broker).await;
    client.send_and_wait(&book(1, "Ada"), WAIT).await.unwrap();
    assert_eq!(*attempts.lock(), 2, "failed once, retried, then answered");
    client.send(&book(2, "Bo")).await.unwrap();
    wait_for("plain send retried too", || *attempts.lock() == 4).await;
    client.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_second_processor_for_the_same_command_fails_at_start_up() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let mut first = CommandProcessor::new(broker.subscriber());
    first.handle(|_: BookRoom, _| async { Ok(()) }).unwrap();
    first.add_to(&router).await.unwrap();
    let mut second = CommandProcessor::new(broker.subscriber());
    second.handle(|_: BookRoom, _| async { Ok(()) }).unwrap();
    let err = second.add_to(&router).await.unwrap_err();
    assert!(matches!(err, CqrsError::Router(_)), "{err}");
    assert!(err.to_string().contains("BookRoom-handler"), "{err}");
    assert_eq!(router.handlers(), vec!["BookRoom-handler".to_owned()]);
}

#[tokio::test]
async fn an_event_processor_layer_wraps_each_handler() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut events = EventProcessor::new(broker.subscriber());
    events.layer(
        Retry::new()
            .max_attempts(2)
            .backoff(Backoff::new(Duration::from_millis(1))),
    );
    for name in ["flaky", "steady"] {
        let c = calls.clone();
        events
            .handle(name, move |_: RoomBooked, ctx: Context| {
                let c = c.clone();
                async move {
                    let first = {
                        let mut calls = c.lock();
                        calls.push((name, ctx.attempt()));
                        calls.iter().filter(|(n, _)| *n == name).count() == 1
                    };
                    if name == "flaky" && first {
                        return Err("not yet".into());
                    }
                    Ok(())
                }
            })
            .unwrap();
    }
    events.add_to(&router).await.unwrap();
    start(&router).await;
    EventBus::new(broker.publisher())
        .publish(&RoomBooked { room: 4 })
        .await
        .unwrap();
    wait_for("flaky retried, steady once", || {
        let calls = calls.lock();
        calls.iter().filter(|(n, _)| *n == "flaky").count() == 2
            && calls.iter().any(|(n, _)| *n == "steady")
    })
    .await;
    wait_for("both acked", || {
        broker.group_backlog("events.RoomBooked", "flaky") == Some(0)
            && broker.group_backlog("events.RoomBooked", "steady") == Some(0)
    })
    .await;
    let calls = calls.lock().clone();
    assert_eq!(calls.iter().filter(|(n, _)| *n == "steady").count(), 1);
    let flaky: Vec<_> = calls.iter().filter(|(n, _)| *n == "flaky").collect();
    assert_eq!(flaky.len(), 2, "{calls:?}");
    assert!(
        flaky.iter().all(|(_, attempt)| *attempt == Some(1)),
        "retried in-process, not redelivered: {calls:?}"
    );
    router.close().await.unwrap();
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Quote {
    room: u32,
    cents: u64,
}

#[tokio::test]
async fn send_and_wait_for_returns_the_handlers_typed_result() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let errors = ErrorLog::passing();
    router.layer(errors.clone());
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let mut commands = CommandProcessor::new(broker.subscriber()).with_replies(broker.publisher());
    commands
        .handle_with_result(move |cmd: BookRoom, _| {
            let h = h.clone();
            async move {
                if cmd.room == 13 {
                    return Err(permanent("there is no room 13"));
                }
                h.lock().push(cmd.room);
                Ok(Quote {
                    room: cmd.room,
                    cents: 12_000,
                })
            }
        })
        .unwrap();
    assert!(matches!(
        commands.handle(|_: BookRoom, _| async { Ok(()) }),
        Err(CqrsError::DuplicateCommandHandler(_))
    ));
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    let client = client(&broker).await;

    let quote: Quote = client
        .send_and_wait_for(&book(101, "Ada"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        quote,
        Quote {
            room: 101,
            cents: 12_000
        }
    );
    // Without asking for the result, and by plain send (the result is dropped).
    client.send_and_wait(&book(102, "Bo"), WAIT).await.unwrap();
    client.send(&book(103, "Cy")).await.unwrap();
    wait_for("plain send handled", || handled.lock().len() == 3).await;
    wait_for("acked", || {
        broker.group_backlog("commands.BookRoom", "BookRoom-handler") == Some(0)
    })
    .await;
    // Errors come back as with send_and_wait.
    let err = client
        .send_and_wait_for::<_, Quote>(&book(13, "Di"), WAIT)
        .await
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("no room 13"),
        "{err}"
    );
    // A result of another shape does not decode.
    let err = client
        .send_and_wait_for::<_, Vec<String>>(&book(104, "Ed"), WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CqrsError::ResultDecode { name, result, .. }
            if name == "BookRoom" && result == "Vec<String>"),
        "{err}"
    );
    assert!(errors.0.lock().is_empty(), "{:?}", errors.0.lock());
    client.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn send_and_wait_for_a_handler_without_result_says_so() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    booking_service(&broker, &router).await;
    start(&router).await;
    let client = client(&broker).await;
    let err = client
        .send_and_wait_for::<_, Quote>(&book(101, "Ada"), WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CqrsError::NoResult { name } if name == "BookRoom"),
        "{err}"
    );
    assert!(err.to_string().contains("handle_with_result"), "{err}");
    client.close().await;
    router.close().await.unwrap();
}

// ---- interop and the reliability layers ------------------------------------------------

/// With [`TypeHeader::watermill`], the buses tag messages the way Watermill's CQRS component
/// does (`name` metadata) and the processors dispatch messages tagged that way by another
/// service; the default `cqrs-name` is not written.
#[tokio::test]
async fn the_watermill_type_header_works_both_ways() {
    let broker = MemoryBroker::new();
    let mut sent = subscribe(&broker, "events.RoomBooked").await;
    EventBus::new(broker.publisher())
        .with_type_header(TypeHeader::watermill())
        .publish(&RoomBooked { room: 3 })
        .await
        .unwrap();
    let msg = next(&mut sent).await;
    assert_eq!(msg.metadata().get("name"), Some("RoomBooked"));
    assert_eq!(msg.metadata().get(NAME_KEY), None);

    let router = Router::new();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let mut events =
        EventProcessor::new(broker.subscriber()).with_type_header(TypeHeader::watermill());
    events
        .handle("rooms", move |e: RoomBooked, _| {
            g.lock().push(e.room);
            async { Ok(()) }
        })
        .unwrap();
    let mut commands =
        CommandProcessor::new(broker.subscriber()).with_type_header(TypeHeader::watermill());
    let booked = Arc::new(Mutex::new(Vec::new()));
    let b = booked.clone();
    commands
        .handle(move |c: BookRoom, _| {
            b.lock().push(c.guest);
            async { Ok(()) }
        })
        .unwrap();
    events.add_to(&router).await.unwrap();
    commands.add_to(&router).await.unwrap();
    start(&router).await;
    // What a Watermill Go service publishes: JSON, the type in `name`.
    let p = broker.publisher();
    p.publish_one(
        "events.RoomBooked",
        Message::new(r#"{"room":8}"#).with_metadata("name", "RoomBooked"),
    )
    .await
    .unwrap();
    p.publish_one(
        "commands.BookRoom",
        Message::new(r#"{"room":8,"guest":"Go"}"#).with_metadata("name", "BookRoom"),
    )
    .await
    .unwrap();
    wait_for("both dispatched", || {
        got.lock().contains(&8) && booked.lock().contains(&"Go".to_owned())
    })
    .await;
    router.close().await.unwrap();
}

/// Processor layers compose with the reliability stack: a command whose handler always
/// fails is retried in-process, redelivered, and dead-lettered after `max_deliveries`
/// deliveries with its history; an undecodable one goes to the poison topic without the
/// handler being called; the same holds for an event processor.
#[tokio::test]
async fn processors_retry_dead_letter_and_poison_as_documented() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(tidemill_core::RouterConfig {
        redelivery: Backoff::new(Duration::from_millis(5)),
        ..Default::default()
    });
    let mut dead = subscribe(&broker, "dead").await;
    let mut poison = subscribe(&broker, "poison").await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    // Outermost first: dead letter, poison queue, retry.
    let stack = || {
        let dl = DeadLetter::new(broker.publisher(), "dead").max_deliveries(2);
        let pq = PoisonQueue::new(broker.publisher(), "poison");
        let retry = Retry::new()
            .max_attempts(3)
            .backoff(Backoff::new(Duration::from_millis(1)));
        (dl, pq, retry)
    };
    let mut commands = CommandProcessor::new(broker.subscriber());
    let (dl, pq, retry) = stack();
    commands.layer(dl).layer(pq).layer(retry);
    let c = calls.clone();
    commands
        .handle(move |cmd: BookRoom, ctx: Context| {
            c.lock().push(("command", cmd.room, ctx.attempt()));
            async { Err::<(), BoxError>("hotel system down".into()) }
        })
        .unwrap();
    let mut events = EventProcessor::new(broker.subscriber());
    let (dl, pq, retry) = stack();
    events.layer(dl).layer(pq).layer(retry);
    let c = calls.clone();
    events
        .handle("cleaning", move |e: RoomCleaned, ctx: Context| {
            c.lock().push(("event", e.room, ctx.attempt()));
            async { Err::<(), BoxError>("mop broken".into()) }
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    events.add_to(&router).await.unwrap();
    start(&router).await;
    CommandBus::new(broker.publisher())
        .send(&book(5, "Cy"))
        .await
        .unwrap();
    EventBus::new(broker.publisher())
        .publish(&RoomCleaned { room: 6 })
        .await
        .unwrap();
    broker
        .publisher()
        .publish_one(
            "commands.BookRoom",
            Message::new("{broken").with_metadata(NAME_KEY, "BookRoom"),
        )
        .await
        .unwrap();
    let mut dead_letters = [next(&mut dead).await, next(&mut dead).await];
    dead_letters.sort_by_key(|m| {
        m.metadata()
            .get(headers::DEAD_LETTER_TOPIC)
            .map(str::to_owned)
    });
    for (m, topic, reason) in [
        (&dead_letters[0], "commands.BookRoom", "hotel system down"),
        (&dead_letters[1], "events.RoomCleaned", "mop broken"),
    ] {
        let md = m.metadata();
        assert_eq!(md.get(headers::DEAD_LETTER_TOPIC), Some(topic));
        assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some(reason));
        assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("2"));
        for n in 1..=2 {
            let entry = md
                .get(&format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX))
                .unwrap_or_else(|| panic!("history entry {n} in {md:?}"));
            assert!(entry.ends_with(reason), "{entry}");
        }
    }
    let poisoned = next(&mut poison).await;
    assert_eq!(poisoned.payload().as_ref(), b"{broken");
    assert!(poisoned
        .metadata()
        .get(headers::POISON_REASON)
        .is_some_and(|r| r.contains("cannot decode command `BookRoom`")));
    router.close().await.unwrap();
    let calls = calls.lock().clone();
    for (kind, room) in [("command", 5), ("event", 6)] {
        let mine: Vec<_> = calls.iter().filter(|c| c.0 == kind).collect();
        assert!(mine.iter().all(|c| c.1 == room), "{calls:?}");
        // Three in-process attempts on each of two deliveries.
        assert_eq!(mine.len(), 6, "{kind}: {calls:?}");
        assert_eq!(
            mine.iter().map(|c| c.2).collect::<Vec<_>>(),
            [Some(1), Some(1), Some(1), Some(2), Some(2), Some(2)],
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_batch_projection_gets_decoded_events_and_each_bad_one_is_poisoned() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let mut poisoned = subscribe(&broker, "poison").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut events = EventProcessor::new(broker.subscriber());
    events.layer(PoisonQueue::new(broker.publisher(), "poison"));
    events
        .handle_batch(
            "occupancy",
            10,
            Duration::from_millis(20),
            move |batch: Vec<(RoomBooked, Context)>| {
                let rooms: Vec<u32> = batch.iter().map(|(e, _)| e.room).collect();
                let mut result = BatchResult::ok();
                if let Some(i) = rooms.iter().position(|&r| r == 13) {
                    result.fail(i, tidemill_core::permanent("room 13 does not exist"));
                }
                tx.send(rooms).unwrap();
                async move { result }
            },
        )
        .unwrap();
    assert!(matches!(
        events.handle("occupancy", |_: RoomBooked, _| async { Ok(()) }),
        Err(CqrsError::DuplicateHandlerName(_))
    ));
    events.add_to(&router).await.unwrap();
    start(&router).await;
    let bus = EventBus::new(broker.publisher());
    for room in [1, 2, 13, 3] {
        bus.publish(&RoomBooked { room }).await.unwrap();
    }
    broker
        .publisher()
        .publish_one(
            "events.RoomBooked",
            Message::with_uuid("bad-evt", "not json").with_metadata(NAME_KEY, "RoomBooked"),
        )
        .await
        .unwrap();
    let mut rooms = Vec::new();
    while rooms.len() < 4 {
        rooms.extend(recv(&mut rx).await);
    }
    rooms.sort_unstable();
    assert_eq!(
        rooms,
        [1, 2, 3, 13],
        "the undecodable event never reaches the projection"
    );
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let msg = next(&mut poisoned).await;
        let reason = msg
            .metadata()
            .get(headers::POISON_REASON)
            .unwrap()
            .to_owned();
        reasons.push((msg.uuid().to_owned(), reason));
    }
    reasons.sort_by_key(|(uuid, _)| uuid != "bad-evt");
    assert_eq!(reasons[0].0, "bad-evt");
    assert!(
        reasons[0].1.contains("cannot decode event `RoomBooked`"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].1.contains("room 13 does not exist"),
        "{reasons:?}"
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_batch_projection_without_layers_gets_its_events_in_order() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut events = EventProcessor::new(broker.subscriber());
    events
        .handle_batch(
            "occupancy",
            3,
            Duration::from_millis(20),
            move |batch: Vec<(RoomBooked, Context)>| {
                tx.send(batch.iter().map(|(e, _)| e.room).collect::<Vec<u32>>())
                    .unwrap();
                async { BatchResult::ok() }
            },
        )
        .unwrap();
    events.add_to(&router).await.unwrap();
    start(&router).await;
    let bus = EventBus::new(broker.publisher());
    for room in 1..=7 {
        bus.publish(&RoomBooked { room }).await.unwrap();
    }
    let mut rooms = Vec::new();
    while rooms.len() < 7 {
        let batch = recv(&mut rx).await;
        assert!((1..=3).contains(&batch.len()), "batch of {}", batch.len());
        rooms.extend(batch);
    }
    assert_eq!(rooms, [1, 2, 3, 4, 5, 6, 7], "in publish order");
    router.close().await.unwrap();
}
