//! CQRS behaviour on the in-memory broker.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidemill_core::router::{BoxHandler, Router};
use tidemill_core::{is_permanent, BoxError, MemoryBroker, Message, Publisher};
use tidemill_cqrs::{
    Command, CommandBus, CommandProcessor, Context, CqrsError, Event, EventBus, EventProcessor,
    TopicNaming, UnknownTypePolicy, NAME_KEY,
};
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

/// Records handler errors (permanent or not) and acks the message, standing in for the
/// poison-queue middleware so the decode errors can be inspected.
#[derive(Clone, Default)]
struct CaptureErrors(Arc<Mutex<Vec<(bool, String)>>>);

impl Layer<BoxHandler> for CaptureErrors {
    type Service = Captured;
    fn layer(&self, inner: BoxHandler) -> Captured {
        Captured(self.0.clone(), inner)
    }
}

struct Captured(Arc<Mutex<Vec<(bool, String)>>>, BoxHandler);

impl Service<Message> for Captured {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.1.poll_ready(cx)
    }
    fn call(&mut self, m: Message) -> Self::Future {
        let log = self.0.clone();
        let fut = self.1.call(m);
        Box::pin(async move {
            match fut.await {
                Ok(out) => Ok(out),
                Err(e) => {
                    log.lock().push((is_permanent(e.as_ref()), e.to_string()));
                    Ok(Vec::new())
                }
            }
        })
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
    let errors = CaptureErrors::default();
    router.layer(errors.clone());
    let handled = Arc::new(Mutex::new(0));
    let h = handled.clone();
    let mut commands = CommandProcessor::new(broker.subscriber());
    commands
        .handle(move |_: BookRoom, _| {
            let h = h.clone();
            async move {
                *h.lock() += 1;
                Ok(())
            }
        })
        .unwrap();
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
        let errors = CaptureErrors::default();
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
