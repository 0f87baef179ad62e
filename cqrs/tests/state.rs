//! Router handlers with typed payloads next to the poison queue, and processors with state,
//! on the in-memory broker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tidemill_core::extract::{Json, MessageContext, State};
use tidemill_core::router::{HandlerResult, Router};
use tidemill_core::{
    DeliveryStream, MemoryBroker, Message, Publisher, SubscribeOptions, Subscriber,
};
use tidemill_cqrs::{Command, CommandBus, CommandProcessor, Event, EventBus, EventProcessor};
use tidemill_middleware::{headers, PoisonQueue};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

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

async fn next(stream: &mut DeliveryStream) -> Message {
    let delivery = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("within 10s")
        .expect("open")
        .expect("a delivery");
    let msg = delivery.message().clone();
    delivery.ack().await.expect("ack");
    msg
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Priced {
    id: String,
    total: u64,
}

#[derive(Clone)]
struct Shop {
    priced: Arc<AtomicU32>,
}

#[tokio::test]
async fn a_payload_the_json_extractor_cannot_decode_goes_to_the_poison_topic_with_its_reason() {
    let broker = MemoryBroker::new();
    let shop = Shop {
        priced: Arc::default(),
    };
    let router = Router::new().with_state(shop.clone());
    let poison = PoisonQueue::new(broker.publisher(), "poison");
    router.layer(poison.clone());
    router
        .add_handler("price")
        .subscribe(broker.subscriber(), "orders")
        .publish(broker.publisher(), "priced")
        .handler(
            |State(shop): State<Shop>, ctx: MessageContext, Json(order): Json<Order>| async move {
                shop.priced.fetch_add(1, Ordering::SeqCst);
                assert_eq!(ctx.handler().name, "price");
                HandlerResult::Ok(Json(Priced {
                    id: order.id,
                    total: order.cents * 2,
                }))
            },
        )
        .await
        .unwrap();
    let mut poisoned = broker
        .subscriber()
        .subscribe("poison", SubscribeOptions::new())
        .await
        .unwrap();
    let mut priced = broker
        .subscriber()
        .subscribe("priced", SubscribeOptions::new())
        .await
        .unwrap();
    start(&router).await;

    let garbled = Message::new(r#"{"id": "o-9", "cents": "#);
    let uuid = garbled.uuid().to_owned();
    let publisher = broker.publisher();
    publisher.publish_one("orders", garbled).await.unwrap();
    publisher
        .publish_one("orders", Message::new(r#"{"id":"o-1","cents":300}"#))
        .await
        .unwrap();

    let bad = next(&mut poisoned).await;
    assert_eq!(bad.uuid(), uuid);
    assert_eq!(bad.payload().as_ref(), br#"{"id": "o-9", "cents": "#);
    let md = bad.metadata();
    assert_eq!(md.get(headers::POISON_HANDLER), Some("price"));
    assert_eq!(md.get(headers::POISON_TOPIC), Some("orders"));
    let reason = md.get(headers::POISON_REASON).unwrap_or_default();
    assert!(
        reason.contains(&format!("message {uuid} on topic `orders`"))
            && reason.contains("cannot decode the payload as JSON `Order`")
            && reason.contains("EOF while parsing"),
        "the reason names message, topic, type and the decoder's error: {reason}"
    );

    let good = next(&mut priced).await;
    let value: Priced = serde_json::from_slice(good.payload()).unwrap();
    assert_eq!(
        value,
        Priced {
            id: "o-1".into(),
            total: 600
        }
    );
    assert_eq!(
        shop.priced.load(Ordering::SeqCst),
        1,
        "called for the good one only"
    );
    assert_eq!(poison.poisoned(), 1);
    router.close().await.unwrap();
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ping {
    n: u32,
}
impl Command for Ping {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ponged {
    n: u32,
}
impl Event for Ponged {}

/// What the processors' handlers share.
#[derive(Clone)]
struct Table {
    events: EventBus,
    pings: Arc<AtomicU32>,
    seen: mpsc::UnboundedSender<String>,
}

#[tokio::test]
async fn processors_hand_their_state_to_every_handler() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (seen, mut rx) = mpsc::unbounded_channel();
    let table = Table {
        events: EventBus::new(broker.publisher()),
        pings: Arc::default(),
        seen,
    };
    let mut commands = CommandProcessor::new(broker.subscriber()).with_state(table.clone());
    commands
        .handle(|ping: Ping, ctx| async move {
            let table = ctx.state();
            table.pings.fetch_add(1, Ordering::SeqCst);
            table.events.publish(&Ponged { n: ping.n }).await?;
            Ok(())
        })
        .unwrap();
    let mut events = EventProcessor::new(broker.subscriber()).with_state(table.clone());
    events
        .handle("echo", |e: Ponged, ctx| async move {
            ctx.state().seen.send(format!("echo {}", e.n))?;
            Ok(())
        })
        .unwrap();
    events
        .group("grouped")
        .handle(|e: Ponged, ctx| async move {
            ctx.into_state().seen.send(format!("group {}", e.n))?;
            Ok(())
        })
        .unwrap()
        .done()
        .unwrap();
    commands.add_to(&router).await.unwrap();
    events.add_to(&router).await.unwrap();
    // No marshaler annotation needed for the handler name.
    assert!(router
        .handlers()
        .contains(&CommandProcessor::handler_name("Ping")));
    start(&router).await;
    CommandBus::new(broker.publisher())
        .send(&Ping { n: 7 })
        .await
        .unwrap();
    let mut got = [recv(&mut rx).await, recv(&mut rx).await];
    got.sort();
    assert_eq!(got, ["echo 7", "group 7"]);
    assert_eq!(table.pings.load(Ordering::SeqCst), 1);
    router.close().await.unwrap();
}

#[cfg(feature = "protobuf")]
#[tokio::test]
async fn protobuf_in_protobuf_out_on_a_router_handler() {
    use tidemill_core::extract::Protobuf;
    use tidemill_cqrs::Marshal;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Reading {
        #[prost(uint32, tag = "1")]
        celsius: u32,
    }

    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("convert")
        .subscribe(broker.subscriber(), "readings")
        .publish(broker.publisher(), "converted")
        .handler(|Protobuf(r): Protobuf<Reading>| async move {
            Protobuf(Reading {
                celsius: r.celsius + 1,
            })
        })
        .await
        .unwrap();
    let mut converted = broker
        .subscriber()
        .subscribe("converted", SubscribeOptions::new())
        .await
        .unwrap();
    start(&router).await;
    // Encoded by the same marshaler CQRS buses use.
    let payload = tidemill_cqrs::Protobuf
        .marshal(&Reading { celsius: 20 })
        .unwrap();
    broker
        .publisher()
        .publish_one("readings", Message::new(payload))
        .await
        .unwrap();
    let out = next(&mut converted).await;
    assert_eq!(
        out.metadata().get(tidemill_cqrs::CONTENT_TYPE_KEY),
        Some("application/x-protobuf")
    );
    let back: Reading = tidemill_cqrs::Protobuf.unmarshal(out.payload()).unwrap();
    assert_eq!(back.celsius, 21);
    router.close().await.unwrap();
}
