//! CQRS on any broker: a small hotel.
//!
//! Run: `cargo run --example cqrs` (in-memory broker), or on a real broker:
//! `TIDEMILL_BROKER=nats://127.0.0.1:4222 cargo run --features nats --example cqrs`
//! (any URL `tidemill::BrokerConfig::from_url` accepts, with the broker's feature).
//!
//! - The front desk sends `BookRoom` and waits for the verdict (send-and-wait): a booking
//!   of a room already taken is refused with a permanent error that comes back to it.
//! - A booking publishes `RoomBooked`; two event handlers each get every event: billing
//!   sends `IssueInvoice`, the concierge notifies the guest.
//! - The billing system fails its first `IssueInvoice`; the `Retry` layer on the command
//!   processor handles it again.
//!
//! Topics and consumer groups carry a per-run suffix, so leftovers on persistent brokers do
//! not disturb a rerun. The program checks its outcome and exits non-zero if it is wrong.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tidemill::cqrs::{
    Command, CommandBus, CommandProcessor, Event, EventBus, EventProcessor, TopicNaming,
};
use tidemill::middleware::request_reply::RequesterConfig;
use tidemill::middleware::{Backoff, PoisonQueue, Retry};
use tidemill::{permanent, BrokerConfig, Router};

#[derive(Debug, Serialize, Deserialize)]
struct BookRoom {
    room: u32,
    guest: String,
    nights: u32,
}
impl Command for BookRoom {}

#[derive(Debug, Serialize, Deserialize)]
struct IssueInvoice {
    guest: String,
    amount: u32,
}
impl Command for IssueInvoice {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoomBooked {
    room: u32,
    guest: String,
    nights: u32,
}
impl Event for RoomBooked {}

/// What happened, for the final check.
#[derive(Default)]
struct Hotel {
    rooms: Mutex<Vec<u32>>,
    invoices: Mutex<Vec<String>>,
    notifications: Mutex<Vec<String>>,
    billing_calls: AtomicU32,
    retries: AtomicU32,
}

/// What the handlers share: cheap to clone (an `Arc` and two bus handles).
#[derive(Clone)]
struct Desk {
    hotel: Arc<Hotel>,
    events: EventBus,
    commands: CommandBus,
}

/// Locks, ignoring poisoning (a panicking handler is reported by the router anyway).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const PRICE_PER_NIGHT: u32 = 120;

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = tokio::time::timeout(Duration::from_secs(30), run())
        .await
        .unwrap_or_else(|_| Err("did not finish within 30 s".into()));
    match outcome {
        Ok(()) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cqrs example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let config = BrokerConfig::from_env()?;
    println!("broker: {:?}", config.kind());
    let broker = config.connect().await?;
    let (publisher, subscriber) = (broker.publisher.clone(), broker.subscriber.clone());
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let hotel = Arc::new(Hotel::default());

    // --- the example's core -------------------------------------------------------------
    let prefix = format!("hotel-{run_id}");
    let (p1, p2) = (prefix.clone(), prefix.clone());
    let commands_on = TopicNaming::new(move |name| format!("{p1}.commands.{name}"));
    let events_on = TopicNaming::new(move |name| format!("{p2}.events.{name}"));
    let g = prefix.clone();
    let group = move |handler: &str| format!("{g}-{handler}");

    let router = Router::new();
    let poison = PoisonQueue::new(publisher.clone(), format!("{prefix}.poison"));
    router.layer(poison.clone());
    let command_bus = CommandBus::new(publisher.clone()).with_topic_naming(commands_on.clone());
    let event_bus = EventBus::new(publisher.clone()).with_topic_naming(events_on.clone());

    // The handlers' state: each handler gets it with every message (`ctx.state()`).
    let desk = Desk {
        hotel: hotel.clone(),
        events: event_bus,
        commands: command_bus.clone(),
    };
    let mut commands = CommandProcessor::new(subscriber.clone())
        .with_topic_naming(commands_on)
        .with_group_naming(group.clone())
        .with_replies(publisher.clone())
        .with_state(desk.clone());
    let h = hotel.clone();
    commands.layer(
        Retry::new()
            .max_attempts(3)
            .backoff(Backoff::new(Duration::from_millis(100)))
            .on_retry(move |r| {
                h.retries.fetch_add(1, Ordering::Relaxed);
                println!(
                    "  retry: attempt {} failed ({}), again in {:?}",
                    r.attempt, r.error, r.delay
                );
            }),
    );
    commands.handle(|cmd: BookRoom, ctx| async move {
        let desk = ctx.state();
        {
            let mut rooms = lock(&desk.hotel.rooms);
            if rooms.contains(&cmd.room) {
                return Err(permanent(format!("room {} is already taken", cmd.room)));
            }
            rooms.push(cmd.room);
        }
        let BookRoom {
            room,
            guest,
            nights,
        } = cmd;
        let booked = RoomBooked {
            room,
            guest,
            nights,
        };
        desk.events.publish(&booked).await?;
        Ok(())
    })?;
    commands.handle(|cmd: IssueInvoice, ctx| async move {
        let hotel = &ctx.state().hotel;
        if hotel.billing_calls.fetch_add(1, Ordering::Relaxed) == 0 {
            return Err("billing system is still starting up".into());
        }
        println!("  billing: invoice of {} EUR for {}", cmd.amount, cmd.guest);
        lock(&hotel.invoices).push(cmd.guest);
        Ok(())
    })?;

    let mut events = EventProcessor::new(subscriber.clone())
        .with_topic_naming(events_on)
        .with_group_naming(group)
        .with_state(desk);
    events.handle("billing", |e: RoomBooked, ctx| async move {
        let amount = e.nights * PRICE_PER_NIGHT;
        let invoice = IssueInvoice {
            guest: e.guest,
            amount,
        };
        ctx.state().commands.send(&invoice).await?;
        Ok(())
    })?;
    events.handle("concierge", |e: RoomBooked, ctx| async move {
        println!("  concierge: welcome {}, room {} is yours", e.guest, e.room);
        lock(&ctx.state().hotel.notifications).push(e.guest);
        Ok(())
    })?;
    commands.add_to(&router).await?;
    events.add_to(&router).await?;
    // --- end of the core ----------------------------------------------------------------

    let running = router.clone();
    let router_task = tokio::spawn(async move { running.run().await });
    tokio::time::timeout(Duration::from_secs(20), router.running())
        .await
        .map_err(|_| "the router did not start within 20 s")?;
    let front_desk = command_bus
        .connect_client(subscriber.clone(), RequesterConfig::default())
        .await?;

    let mut refused = Vec::new();
    for (room, guest, nights) in [(101, "Ada", 2), (102, "Grace", 3), (101, "Linus", 1)] {
        let cmd = BookRoom {
            room,
            guest: guest.into(),
            nights,
        };
        println!("front desk: book room {room} for {guest}, {nights} night(s)");
        match front_desk
            .send_and_wait(&cmd, Duration::from_secs(15))
            .await
        {
            Ok(()) => println!("front desk: booked"),
            Err(e) if e.is_permanent() => {
                println!("front desk: refused: {e}");
                refused.push(guest);
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Invoices and notifications follow asynchronously; wait for them (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while (lock(&hotel.invoices).len() < 2 || lock(&hotel.notifications).len() < 2)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give stray duplicates a moment to show up before checking exact counts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    front_desk.close().await;
    router.close().await?;
    router_task.await??;

    let mut invoices = lock(&hotel.invoices).clone();
    let mut notified = lock(&hotel.notifications).clone();
    invoices.sort();
    notified.sort();
    let rooms = lock(&hotel.rooms).clone();
    let (calls, retries) = (
        hotel.billing_calls.load(Ordering::Relaxed),
        hotel.retries.load(Ordering::Relaxed),
    );
    println!(
        "summary: rooms {rooms:?}, refused {refused:?}, invoices {invoices:?}, notified \
         {notified:?}, billing calls {calls}, retries {retries}, poisoned {}",
        poison.poisoned()
    );
    let mut wrong = Vec::new();
    let mut expect = |what: &str, ok: bool| {
        if !ok {
            wrong.push(what.to_owned());
        }
    };
    expect("rooms 101 and 102 booked", rooms == [101, 102]);
    expect("Linus refused (room 101 taken)", refused == ["Linus"]);
    expect("invoices for Ada and Grace", invoices == ["Ada", "Grace"]);
    expect("Ada and Grace notified", notified == ["Ada", "Grace"]);
    expect("three billing calls (one failed)", calls == 3);
    expect("one retry", retries == 1);
    expect("nothing poisoned", poison.poisoned() == 0);
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected outcome: {}", wrong.join("; ")).into())
    }
}
