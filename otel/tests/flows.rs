//! Trace continuity through CQRS (command → event → command) and request-reply, on the
//! in-memory broker: the buses, the replier and the requester publish through an
//! instrumented publisher, the router continues each message's trace.

mod common;

use std::time::Duration;

use common::{assert_child, find, trace_id, Traces};
use serde::{Deserialize, Serialize};
use tidemill_core::{HandlerResult, MemoryBroker, Message, Router, RouterConfig};
use tidemill_cqrs::{Command, CommandBus, CommandProcessor, Event, EventBus, EventProcessor};
use tidemill_middleware::request_reply::{Replier, Requester, RequesterConfig};
use tidemill_otel::{InstrumentedPublisher, OtelTracer};
use tokio::sync::mpsc;
use tracing::Instrument;

#[derive(Serialize, Deserialize)]
struct BookRoom {
    room: u32,
}
impl Command for BookRoom {}

#[derive(Serialize, Deserialize)]
struct RoomBooked {
    room: u32,
}
impl Event for RoomBooked {}

#[derive(Serialize, Deserialize)]
struct IssueInvoice {
    room: u32,
}
impl Command for IssueInvoice {}

#[derive(Clone)]
struct Desk {
    events: EventBus,
    commands: CommandBus,
    done: mpsc::UnboundedSender<u32>,
}

fn traced_router() -> Router {
    Router::with_config(RouterConfig::default().with_tracer(OtelTracer::new()))
}

#[tokio::test]
async fn command_event_command_is_one_trace() {
    let traces = Traces::install();
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let (done, mut finished) = mpsc::unbounded_channel();
    let desk = Desk {
        events: EventBus::new(publisher.clone()),
        commands: CommandBus::new(publisher.clone()),
        done,
    };
    let router = traced_router();
    let mut commands = CommandProcessor::new(broker.subscriber()).with_state(desk.clone());
    commands
        .handle(|c: BookRoom, ctx| async move {
            ctx.state()
                .events
                .publish(&RoomBooked { room: c.room })
                .await?;
            Ok(())
        })
        .unwrap();
    commands
        .handle(|c: IssueInvoice, ctx| async move {
            let _ = ctx.state().done.send(c.room);
            Ok(())
        })
        .unwrap();
    let mut events = EventProcessor::new(broker.subscriber()).with_state(desk.clone());
    events
        .handle("billing", |e: RoomBooked, ctx| async move {
            ctx.state()
                .commands
                .send(&IssueInvoice { room: e.room })
                .await?;
            Ok(())
        })
        .unwrap();
    commands.add_to(&router).await.unwrap();
    events.add_to(&router).await.unwrap();
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    router.running().await;

    let front_desk = tracing::info_span!("front desk");
    desk.commands
        .send(&BookRoom { room: 101 })
        .instrument(front_desk.clone())
        .await
        .unwrap();
    assert_eq!(finished.recv().await, Some(101));
    router.close().await.unwrap();
    drop(front_desk);

    let spans = traces.spans();
    let root = spans.iter().find(|s| s.name == "front desk").unwrap();
    let by_destination =
        |name: &str, topic: &str| find(&spans, name, "messaging.destination.name", topic).clone();
    let send_book = by_destination("send commands.BookRoom", "commands.BookRoom");
    let process_book = by_destination("process commands.BookRoom", "commands.BookRoom");
    let send_booked = by_destination("send events.RoomBooked", "events.RoomBooked");
    let process_booked = by_destination("process events.RoomBooked", "events.RoomBooked");
    let send_invoice = by_destination("send commands.IssueInvoice", "commands.IssueInvoice");
    let process_invoice = by_destination("process commands.IssueInvoice", "commands.IssueInvoice");
    assert_child(&send_book, root, &spans);
    assert_child(&process_book, &send_book, &spans);
    assert_child(&send_booked, &process_book, &spans);
    assert_child(&process_booked, &send_booked, &spans);
    assert_child(&send_invoice, &process_booked, &spans);
    assert_child(&process_invoice, &send_invoice, &spans);
    assert_eq!(trace_id(&process_invoice), trace_id(root));
}

#[tokio::test]
async fn request_and_reply_are_one_trace() {
    let traces = Traces::install();
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let router = traced_router();
    router
        .add_handler("quote")
        .subscribe(broker.subscriber(), "quotes")
        .group("quote")
        .layer(Replier::new(publisher.clone()))
        .handler(|_req: Message| async move { HandlerResult::Ok(Message::new("1050")) })
        .await
        .unwrap();
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    router.running().await;
    let requester = Requester::connect(
        publisher.clone(),
        broker.subscriber(),
        RequesterConfig::default().reply_topic("quote-replies"),
    )
    .await
    .unwrap();
    let checkout = tracing::info_span!("checkout");
    let reply = requester
        .request_timeout("quotes", Message::new("3"), Duration::from_secs(30))
        .instrument(checkout.clone())
        .await
        .unwrap();
    assert_eq!(reply.payload().as_ref(), b"1050");
    requester.close().await;
    router.close().await.unwrap();
    drop(checkout);

    let spans = traces.spans();
    let root = spans.iter().find(|s| s.name == "checkout").unwrap();
    let send_request = find(
        &spans,
        "send quotes",
        "messaging.destination.name",
        "quotes",
    );
    let process = find(&spans, "process quotes", "tidemill.handler", "quote");
    let send_reply = find(
        &spans,
        "send quote-replies",
        "messaging.destination.name",
        "quote-replies",
    );
    assert_child(send_request, root, &spans);
    assert_child(process, send_request, &spans);
    assert_child(send_reply, process, &spans);
    // The reply carries the trace back: its context names the replier's send span.
    let cx = tidemill_otel::extract(&reply);
    use opentelemetry::trace::TraceContextExt;
    assert_eq!(cx.span().span_context().trace_id(), trace_id(root));
}
