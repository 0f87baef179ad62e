//! An order flow that runs unchanged on every broker Tidemill supports.
//!
//! ```text
//! make run                                   # the embedded in-memory broker
//! make run BROKER=kafka://127.0.0.1:9093     # or amqp://…, nats://…, pubsub://project?emulator=…
//! cargo run --example order_flow --features otel,nats -- nats://127.0.0.1:4223
//! RUST_LOG=info cargo run --example order_flow --features otel   # plus the router's logs
//! ```
//!
//! The broker URL comes from the first argument, else `BROKER`, else `TIDEMILL_BROKER`,
//! else `memory://`. What happens:
//!
//! ```text
//!  PlaceOrder ──► PlaceOrder-handler ──► OrderPlaced ──┬──► reserve-stock
//!  (command bus)  validates, prices       (event bus)  ├──► charge-payment ── payment gateway
//!                                                      └──► notify-customer ── mailer
//!  any permanent failure ──► poison topic ──► poison-report (marks the order failed,
//!                                                            releases its stock)
//!  Requester ── "status of ord-004?" ──► order-status (Replier) ── reads the state store
//! ```
//!
//! - Commands and events are typed (tidemill-cqrs, JSON); each event handler has its own
//!   consumer group, so each sees every event.
//! - Router-level layers wrap every handler: correlation ids, a poison queue for
//!   permanent errors, in-process retries with exponential backoff for transient ones, and
//!   panic recovery.
//! - The scenario: 9 orders. Two are paid with a card whose gateway times out twice
//!   (retried, then paid); one card is declined (poisoned by charge-payment); one order
//!   names an unknown product (poisoned by the command handler); and one command is not
//!   even valid JSON (poisoned: cannot decode). The example reads the poison topic, asks
//!   the status of every order over request-reply, checks everything, prints a summary,
//!   and exits 0 only if all went as expected (1 otherwise, saying what did not).
//! - Topics and consumer groups carry a per-run id, so leftovers of an earlier run on a
//!   persistent broker (Kafka topics, RabbitMQ queues, JetStream streams, Pub/Sub
//!   subscriptions) cannot interfere.

mod domain;
mod observe;
mod services;
mod store;

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemill::cqrs::{
    CommandBus, CommandProcessor, EventBus, EventProcessor, TopicNaming, CONTENT_TYPE_KEY, NAME_KEY,
};
use tidemill::extract::{Json, State};
use tidemill::middleware::request_reply::{
    Replier, ReplyErrorKind, RequestError, Requester, RequesterConfig,
};
use tidemill::middleware::{headers, Backoff, CorrelationId, PoisonQueue, Recoverer, Retry};
use tidemill::otel::OtelTracer;
use tidemill::{
    permanent, BoxError, Broker, BrokerConfig, HandlerResult, Message, Publisher, Router,
    RouterConfig,
};
use tracing::Instrument;

use domain::{
    catalogue, scenario, Expect, OrderPlaced, PlaceOrder, Scenario, CHARGE_PAYMENT,
    GARBLED_COMMAND, GARBLED_REASON, INITIAL_STOCK, NOTIFY_CUSTOMER, PLACE_ORDER_HANDLER,
    RESERVE_STOCK,
};
use services::{GatewayError, Mailer, PaymentGateway};
use store::{cents, OrderStatus, PoisonRecord, Store};

/// Every wait is bounded by this (generous: Kafka consumer groups take seconds to form).
const WAIT: Duration = Duration::from_secs(60);

type AnyError = Box<dyn Error + Send + Sync>;

/// The topics of one run, all under `orderflow-<run id>`.
struct Topics {
    prefix: String,
    poison: String,
    status: String,
    replies: String,
}

impl Topics {
    fn new(run_id: &str) -> Self {
        let prefix = format!("orderflow-{run_id}");
        Topics {
            poison: format!("{prefix}.poison"),
            status: format!("{prefix}.order-status"),
            replies: format!("{prefix}.replies"),
            prefix,
        }
    }

    fn commands(&self) -> TopicNaming {
        let prefix = self.prefix.clone();
        TopicNaming::new(move |name| format!("{prefix}.commands.{name}"))
    }

    fn events(&self) -> TopicNaming {
        let prefix = self.prefix.clone();
        TopicNaming::new(move |name| format!("{prefix}.events.{name}"))
    }
}

/// The broker URL and where it came from.
fn broker_url() -> (String, &'static str) {
    if let Some(arg) = std::env::args().nth(1).filter(|a| !a.is_empty()) {
        return (arg, "command line");
    }
    for var in ["BROKER", tidemill::broker::BROKER_ENV] {
        if let Some(url) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            return (url, var);
        }
    }
    ("memory://".to_owned(), "default")
}

#[tokio::main]
async fn main() -> ExitCode {
    let observability = observe::Observability::install();
    if matches!(std::env::args().nth(1).as_deref(), Some("-h" | "--help")) {
        println!(
            "usage: order_flow [BROKER_URL]   (default: $BROKER, $TIDEMILL_BROKER, memory://)"
        );
        return ExitCode::SUCCESS;
    }
    match run(&observability).await {
        Ok(report) if report.problems.is_empty() => {
            println!("\norder_flow: OK on {}: {}", report.broker, report.verdict);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            eprintln!(
                "\norder_flow: FAILED on {}: {} problem(s):",
                report.broker,
                report.problems.len()
            );
            for p in &report.problems {
                eprintln!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                // Wrappers often display their source already: do not repeat it.
                let s_text = s.to_string();
                if !text.ends_with(&s_text) {
                    text.push_str(&format!("\n  caused by: {s_text}"));
                }
                source = s.source();
            }
            eprintln!("\norder_flow: FAILED: {text}");
            ExitCode::FAILURE
        }
    }
}

/// What a run found.
struct Report {
    broker: String,
    verdict: String,
    problems: Vec<String>,
}

/// Everything the handlers share (their state).
struct App {
    store: Arc<Store>,
    gateway: Arc<PaymentGateway>,
    mailer: Arc<Mailer>,
    /// Where `OrderPlaced` goes.
    events: EventBus,
}

fn order_id_of(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("order_id")?.as_str().map(str::to_owned)
}

fn lines_text(lines: &[domain::Line]) -> String {
    lines
        .iter()
        .map(|l| format!("{} × {}", l.qty, l.sku))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run(observability: &observe::Observability) -> Result<Report, AnyError> {
    let (url, source) = broker_url();
    let config = BrokerConfig::from_url(&url)?;
    let kind = config.kind();
    println!("order flow on {kind} ({url}, from {source})");
    let broker: Broker = tokio::time::timeout(WAIT, config.connect())
        .await
        .map_err(|_| format!("connecting to {url} took longer than {WAIT:?}"))??
        // Every publish (buses, layers, replies) carries the trace in metadata.
        .instrumented();

    let uuid = tidemill::new_uuid();
    let hex: String = uuid.chars().filter(char::is_ascii_hexdigit).collect();
    let run_id = hex[hex.len().saturating_sub(8)..].to_owned();
    let topics = Topics::new(&run_id);
    println!("run id {run_id}: topics {}.*\n", topics.prefix);

    let app = Arc::new(App {
        store: Arc::new(Store::new()),
        gateway: Arc::default(),
        mailer: Arc::default(),
        events: EventBus::new(broker.publisher.clone()).with_topic_naming(topics.events()),
    });
    // Each handler's span continues the trace its message carries.
    let router = Router::with_config(RouterConfig {
        close_timeout: Duration::from_secs(15),
        ..RouterConfig::default().with_tracer(OtelTracer::new())
    });

    // Router-level layers wrap every handler (the first added is the outermost): a
    // failure travels from the handler outwards — panics become errors, transient errors
    // are retried in-process, permanent ones (and retries' final failures, if permanent)
    // go to the poison topic. What is left (a transient error that outlived its retries)
    // is nacked by the router and redelivered by the broker.
    let poison = PoisonQueue::new(broker.publisher.clone(), &topics.poison);
    let retry_store = app.store.clone();
    router
        .layer(CorrelationId::new())
        .layer(poison.clone())
        .layer(
            Retry::new()
                .max_attempts(4)
                .backoff(
                    Backoff::new(Duration::from_millis(50)).max_interval(Duration::from_secs(1)),
                )
                .on_retry(move |e| {
                    let order = order_id_of(e.message.payload()).unwrap_or_else(|| "?".into());
                    let handler = e
                        .message
                        .context()
                        .map(|c| c.handler().name.clone())
                        .unwrap_or_default();
                    retry_store.retried(&order, &handler);
                    println!(
                        "  {handler:<18} {order}  attempt {} failed ({}); retrying in {:?}",
                        e.attempt, e.error, e.delay
                    );
                }),
        )
        .layer(Recoverer::new());

    add_handlers(&router, &broker, &topics, &run_id, &app).await?;

    let running = router.clone();
    let run_task = tokio::spawn(async move { running.run().await });
    // Pub/Sub delivers only to subscriptions that exist when a message is published, and
    // Kafka groups start at the end of the topic: send nothing before every handler is
    // subscribed.
    if tokio::time::timeout(WAIT, router.running()).await.is_err() {
        return Err(format!("the router did not start within {WAIT:?}").into());
    }
    if !router.is_running() {
        run_task.await??;
        return Err("the router stopped before it ran".into());
    }
    let requester = Requester::connect(
        broker.publisher.clone(),
        broker.subscriber.clone(),
        RequesterConfig::default()
            .timeout(Duration::from_secs(30))
            .reply_topic(&topics.replies),
    )
    .await?;

    // Place the orders.
    let started = Instant::now();
    let orders = scenario();
    let command_bus =
        CommandBus::new(broker.publisher.clone()).with_topic_naming(topics.commands());
    for o in &orders {
        let c = &o.command;
        println!(
            "→ PlaceOrder {}  {}: {}, card …{}",
            c.order_id,
            c.customer,
            lines_text(&c.lines),
            &c.card[c.card.len().saturating_sub(4)..]
        );
        let place =
            tracing::info_span!(target: observe::TARGET, "place order", order = %c.order_id);
        command_bus.send(c).instrument(place).await?;
    }
    // And one garbled command, as a buggy client might send it.
    let command_topic = command_bus.topic_of::<PlaceOrder>();
    println!("→ PlaceOrder (garbled JSON from a buggy client)");
    broker
        .publisher
        .publish_one(
            &command_topic,
            Message::new(GARBLED_COMMAND)
                .with_metadata(NAME_KEY, "PlaceOrder")
                .with_metadata(CONTENT_TYPE_KEY, "application/json"),
        )
        .await?;

    // Wait (bounded) until every order is settled one way or the other.
    let want_completed = orders
        .iter()
        .filter(|o| !matches!(o.expect, Expect::Poisoned { .. }))
        .count();
    let want_poisoned = orders.len() - want_completed + 1;
    let mut problems = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let (completed, poisoned) = app.store.progress();
        if completed >= want_completed && poisoned >= want_poisoned {
            break;
        }
        if router.is_closed() {
            problems.push("the router stopped while orders were in flight".to_owned());
            break;
        }
        if Instant::now() >= deadline {
            problems.push(format!(
                "gave up after {WAIT:?}: {completed}/{want_completed} orders completed, \
                 {poisoned}/{want_poisoned} messages on the poison topic"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled_in = started.elapsed();

    // Ask for the status of every order (and of one that does not exist), all at once.
    let mut ids: Vec<String> = orders.iter().map(|o| o.command.order_id.clone()).collect();
    ids.push("ord-404".to_owned());
    let replies = futures::future::join_all(ids.iter().map(|id| {
        let requester = requester.clone();
        let topic = topics.status.clone();
        let id = id.clone();
        async move {
            (
                id.clone(),
                requester.request(&topic, Message::new(id)).await,
            )
        }
    }))
    .await;

    let statuses = check(&orders, &app, &replies, &mut problems);
    print_summary(
        &orders,
        &app,
        &topics,
        &statuses,
        settled_in,
        poison.poisoned(),
    );

    requester.close().await;
    router.close().await?;
    match run_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("the router failed: {e}")),
        Err(e) => problems.push(format!("the router task failed: {e}")),
    }
    if let Err(e) = broker.publisher.close().await {
        problems.push(format!("closing the publisher failed: {e}"));
    }
    if let Some(first) = orders.first() {
        observability.print_trace(&first.command.order_id);
    }
    observability.print_counters();

    let completed = app
        .store
        .orders()
        .values()
        .filter(|r| r.is_completed())
        .count();
    Ok(Report {
        broker: format!("{kind} ({url})"),
        verdict: format!(
            "{completed} orders completed, {} poisoned as expected, {} status replies correct; \
             settled in {:.1} s",
            app.store.poison().len(),
            replies.len(),
            settled_in.as_secs_f64()
        ),
        problems,
    })
}

/// Registers the command, event, status and poison handlers. Every handler gets the shared
/// `App` as its state (a clone of the `Arc` per message): typed handlers through their
/// `Context`, router handlers as a `State` argument.
async fn add_handlers(
    router: &Router,
    broker: &Broker,
    topics: &Topics,
    run_id: &str,
    app: &Arc<App>,
) -> Result<(), AnyError> {
    let groups = {
        let run_id = run_id.to_owned();
        move |handler: &str| format!("{handler}-{run_id}")
    };

    // The command: validate, price, record, announce.
    let mut commands = CommandProcessor::new(broker.subscriber.clone())
        .with_topic_naming(topics.commands())
        .with_group_naming(groups.clone())
        .with_state(app.clone());
    commands.handle(|cmd: PlaceOrder, ctx| async move {
        let app = ctx.state();
        if cmd.lines.is_empty() {
            return Err(permanent(format!("order {} has no lines", cmd.order_id)));
        }
        let mut total = 0;
        for line in &cmd.lines {
            let Some((price, _)) = catalogue(&line.sku) else {
                return Err(permanent(format!(
                    "order {}: unknown SKU `{}`",
                    cmd.order_id, line.sku
                )));
            };
            if line.qty == 0 {
                return Err(permanent(format!(
                    "order {}: quantity 0 of {}",
                    cmd.order_id, line.sku
                )));
            }
            total += price * u64::from(line.qty);
        }
        app.store.place(&cmd.order_id, &cmd.customer, total);
        app.events
            .publish(&OrderPlaced {
                order_id: cmd.order_id.clone(),
                customer: cmd.customer,
                email: cmd.email,
                lines: cmd.lines,
                total_cents: total,
                card: cmd.card,
            })
            .await?;
        println!(
            "  {PLACE_ORDER_HANDLER:<18} {}  priced {} → OrderPlaced",
            cmd.order_id,
            cents(total)
        );
        Ok(())
    })?;
    commands.add_to(router).await?;

    // The event, three ways (each handler its own consumer group: each sees every event).
    let mut events = EventProcessor::new(broker.subscriber.clone())
        .with_topic_naming(topics.events())
        .with_group_naming(groups.clone())
        .with_state(app.clone());
    events.handle(RESERVE_STOCK, |e: OrderPlaced, ctx| async move {
        match ctx.state().store.reserve(&e.order_id, &e.lines) {
            Ok(true) => println!(
                "  {RESERVE_STOCK:<18} {}  holding {}",
                e.order_id,
                lines_text(&e.lines)
            ),
            Ok(false) => println!(
                "  {RESERVE_STOCK:<18} {}  order already failed; nothing held",
                e.order_id
            ),
            Err(why) => return Err(permanent(format!("order {}: {why}", e.order_id))),
        }
        Ok(())
    })?;
    events.handle(CHARGE_PAYMENT, |e: OrderPlaced, ctx| async move {
        let app = ctx.state();
        match app.gateway.charge(&e.order_id, &e.card, e.total_cents) {
            Ok(payment) => {
                app.store.paid(&e.order_id, &payment);
                println!(
                    "  {CHARGE_PAYMENT:<18} {}  charged {} ({payment}, delivery {})",
                    e.order_id,
                    cents(e.total_cents),
                    ctx.attempt().map_or("?".to_owned(), |a| a.to_string())
                );
                Ok(())
            }
            // Transient: the Retry layer calls us again.
            Err(e @ GatewayError::Timeout { .. }) => Err(BoxError::from(e)),
            // Permanent: straight to the poison topic.
            Err(e @ GatewayError::Declined { .. }) => Err(permanent(e)),
        }
    })?;
    events.handle(NOTIFY_CUSTOMER, |e: OrderPlaced, ctx| async move {
        let app = ctx.state();
        let text = format!(
            "Hello {}, we received your order {} ({}), total {}.",
            e.customer,
            e.order_id,
            lines_text(&e.lines),
            cents(e.total_cents)
        );
        if app.mailer.send(&e.order_id, &e.email, text) {
            println!("  {NOTIFY_CUSTOMER:<18} {}  mailed {}", e.order_id, e.email);
        }
        app.store.notified(&e.order_id);
        Ok(())
    })?;
    events.add_to(router).await?;

    // Plain router handlers with the app as router-level state.
    let router = router.with_state(app.clone());

    // Request-reply: answers "what is the status of order X?" from the store. The id is
    // the payload as text (a payload that is not UTF-8 fails permanently: an error reply).
    router
        .add_handler("order-status")
        .subscribe(broker.subscriber.clone(), &topics.status)
        .group(groups("order-status"))
        .layer(Replier::new(broker.publisher.clone()))
        .handler(|State(app): State<Arc<App>>, id: String| async move {
            let status = app.store.status(&id);
            let status = status.ok_or_else(|| permanent(format!("no order `{id}`")))?;
            HandlerResult::Ok(Json(status))
        })
        .await?;

    // The poison topic: report what landed there, fail the order, release its stock.
    router
        .add_handler("poison-report")
        .subscribe(broker.subscriber.clone(), &topics.poison)
        .group(groups("poison-report"))
        .handler(|State(app): State<Arc<App>>, m: Message| async move {
            let md = m.metadata();
            let record = PoisonRecord {
                order_id: order_id_of(m.payload()),
                handler: md.get(headers::POISON_HANDLER).unwrap_or("?").to_owned(),
                topic: md.get(headers::POISON_TOPIC).unwrap_or("?").to_owned(),
                reason: md.get(headers::POISON_REASON).unwrap_or("?").to_owned(),
            };
            let line = format!(
                "  {:<18} {}  from {}: {}",
                "poison-report",
                record.order_id.as_deref().unwrap_or("(garbled)"),
                record.handler,
                record.reason
            );
            if app.store.poisoned(m.uuid(), record) {
                println!("{line}");
            }
        })
        .await?;
    Ok(())
}

/// Checks the outcome against the scenario; returns the status replies by order.
fn check(
    orders: &[Scenario],
    app: &App,
    replies: &[(String, Result<Message, RequestError>)],
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let records = app.store.orders();
    let poison = app.store.poison();
    let mut statuses = BTreeMap::new();
    let replies: BTreeMap<&str, &Result<Message, RequestError>> =
        replies.iter().map(|(id, r)| (id.as_str(), r)).collect();

    for o in orders {
        let id = o.command.order_id.as_str();
        let rec = records.get(id).cloned().unwrap_or_default();
        // The order's fate.
        match o.expect {
            Expect::Completed | Expect::CompletedAfterRetries => {
                if !rec.is_completed() {
                    problems.push(format!("{id} should have completed: {:?}", rec.status(id)));
                }
                let retries = app.store.retries(id);
                let calls = app.gateway.calls(id);
                if o.expect == Expect::CompletedAfterRetries {
                    if retries < 2 || calls < 3 {
                        problems.push(format!(
                            "{id}: the gateway fails twice for its card, so it needs ≥ 2 \
                             retries and ≥ 3 calls; saw {retries} retries, {calls} calls"
                        ));
                    }
                } else if retries != 0 {
                    problems.push(format!("{id}: no retry expected, saw {retries}"));
                }
                if let Some(p) = poison.iter().find(|p| p.order_id.as_deref() == Some(id)) {
                    problems.push(format!("{id} must not be poisoned, but was: {}", p.reason));
                }
            }
            Expect::Poisoned { handler, reason } => {
                let hits: Vec<&PoisonRecord> = poison
                    .iter()
                    .filter(|p| p.order_id.as_deref() == Some(id))
                    .collect();
                match hits.as_slice() {
                    [p] if p.handler == handler && p.reason.contains(reason) => {}
                    [p] => problems.push(format!(
                        "{id} should be poisoned by {handler} with a reason containing \
                         {reason:?}; got {} / {:?}",
                        p.handler, p.reason
                    )),
                    other => problems.push(format!(
                        "{id} should be on the poison topic once, found {} time(s)",
                        other.len()
                    )),
                }
                if rec.payment.is_some() {
                    problems.push(format!("{id} failed but was charged"));
                }
            }
        }
        // Its status, asked over request-reply.
        let expected_state = match o.expect {
            Expect::Poisoned { .. } => "failed",
            _ => "completed",
        };
        let got = match replies.get(id) {
            Some(Ok(reply)) => match serde_json::from_slice::<OrderStatus>(reply.payload()) {
                Ok(s) if s.order_id == id && s.state == expected_state => {
                    match o.expect {
                        Expect::Poisoned { reason, .. } if !s.detail.contains(reason) => {
                            problems.push(format!(
                                "status of {id}: detail {:?} does not say {reason:?}",
                                s.detail
                            ));
                        }
                        _ => {}
                    }
                    format!("{} ({})", s.state, s.detail)
                }
                Ok(s) => {
                    problems.push(format!(
                        "status of {id}: expected {expected_state}, got {} ({})",
                        s.state, s.detail
                    ));
                    format!("WRONG: {} ({})", s.state, s.detail)
                }
                Err(e) => {
                    problems.push(format!("status of {id}: undecodable reply: {e}"));
                    "WRONG: undecodable reply".to_owned()
                }
            },
            Some(Err(e)) => {
                problems.push(format!("status of {id}: {e}"));
                format!("WRONG: {e}")
            }
            None => {
                problems.push(format!("status of {id}: not asked"));
                "not asked".to_owned()
            }
        };
        statuses.insert(id.to_owned(), got);
    }

    // The unknown order: a permanent error comes back as the reply.
    let unknown = match replies.get("ord-404") {
        Some(Err(RequestError::Handler { kind, message, .. }))
            if *kind == ReplyErrorKind::Permanent && message.contains("no order `ord-404`") =>
        {
            format!("error reply ({kind}): {message}")
        }
        Some(Err(e)) => {
            problems.push(format!(
                "status of ord-404: expected a permanent error, got {e}"
            ));
            format!("WRONG: {e}")
        }
        Some(Ok(m)) => {
            problems.push(format!(
                "status of ord-404: expected an error, got {:?}",
                String::from_utf8_lossy(m.payload())
            ));
            "WRONG: answered".to_owned()
        }
        None => "not asked".to_owned(),
    };
    statuses.insert("ord-404".to_owned(), unknown);

    // The garbled command.
    let garbled: Vec<&PoisonRecord> = poison.iter().filter(|p| p.order_id.is_none()).collect();
    match garbled.as_slice() {
        [p] if p.handler == PLACE_ORDER_HANDLER && p.reason.contains(GARBLED_REASON) => {}
        [p] => problems.push(format!(
            "the garbled command should be poisoned by {PLACE_ORDER_HANDLER} with a reason \
             containing {GARBLED_REASON:?}; got {} / {:?}",
            p.handler, p.reason
        )),
        other => problems.push(format!(
            "the garbled command should be on the poison topic once, found {} message(s) \
             without an order id",
            other.len()
        )),
    }
    let expected_poison = orders
        .iter()
        .filter(|o| matches!(o.expect, Expect::Poisoned { .. }))
        .count()
        + 1;
    if poison.len() != expected_poison {
        problems.push(format!(
            "{} messages on the poison topic, expected {expected_poison}",
            poison.len()
        ));
    }

    // Stock: only completed orders hold any.
    for (sku, initial) in INITIAL_STOCK {
        let held: i64 = orders
            .iter()
            .filter(|o| {
                records
                    .get(&o.command.order_id)
                    .is_some_and(|r| r.is_completed())
            })
            .flat_map(|o| &o.command.lines)
            .filter(|l| l.sku == sku)
            .map(|l| i64::from(l.qty))
            .sum();
        let left = app.store.stock(sku);
        if left != initial - held {
            problems.push(format!(
                "stock of {sku}: {left} left, expected {initial} - {held} = {}",
                initial - held
            ));
        }
    }
    statuses
}

fn print_summary(
    orders: &[Scenario],
    app: &App,
    topics: &Topics,
    statuses: &BTreeMap<String, String>,
    settled_in: Duration,
    poisoned_here: u64,
) {
    let records = app.store.orders();
    println!("\nOrders (settled in {:.2} s)", settled_in.as_secs_f64());
    for o in orders {
        let c = &o.command;
        let rec = records.get(&c.order_id).cloned().unwrap_or_default();
        let retries = app.store.retries(&c.order_id);
        let note = if retries > 0 {
            format!(", {retries} retries")
        } else {
            String::new()
        };
        println!(
            "  {}  {:<6} {:<22} {:>9}  {}{note}",
            c.order_id,
            c.customer,
            lines_text(&c.lines),
            if rec.placed {
                cents(rec.total_cents)
            } else {
                "-".to_owned()
            },
            if rec.is_completed() {
                "completed"
            } else if rec.failed.is_some() {
                "FAILED"
            } else {
                "in progress"
            },
        );
    }
    println!(
        "\nPoison topic {} ({} published by this process)",
        topics.poison, poisoned_here
    );
    for p in app.store.poison() {
        println!(
            "  {:<9}  {} on {}: {}",
            p.order_id.as_deref().unwrap_or("(garbled)"),
            p.handler,
            p.topic,
            p.reason
        );
    }
    println!("\nStatus replies (request-reply on {})", topics.status);
    for (id, status) in statuses {
        println!("  {id}: {status}");
    }
    let stock: Vec<String> = INITIAL_STOCK
        .iter()
        .map(|(sku, initial)| format!("{sku} {}/{initial}", app.store.stock(sku)))
        .collect();
    println!("\nStock left: {}", stock.join(", "));
    println!("Mails sent: {}", app.mailer.sent());
}
