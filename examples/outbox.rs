//! The transactional outbox and inbox on PostgreSQL, relaying to any broker.
//!
//! Run: `TIDEMILL_POSTGRES_URL=postgres://user:pass@127.0.0.1:5432/db cargo run --features
//! postgres,middleware --example outbox` (events relayed through the in-memory broker), or
//! with `TIDEMILL_BROKER=kafka://127.0.0.1:9092` (and feature `kafka`, etc.) to relay them
//! through a real broker. With only `TIDEMILL_BROKER=postgres://…`, that database serves both.
//!
//! - The order service writes each order row and its `OrderPlaced` event in **one
//!   transaction** (`Outbox::publish_in`). Every tenth order is declined after its row was
//!   written: the transaction rolls back, and its event is never published.
//! - A `Forwarder` (a router handler) relays committed events from the outbox to the broker,
//!   in order per customer, acking each one only after the broker confirmed it.
//! - The projection consumes the events from the broker with an `Inbox`: the running totals
//!   per customer and the record of the handled event id commit together. The first event
//!   is handled and committed, and then the connection to the broker is "lost" before its
//!   ack (the handler reports an error after the commit), so the broker delivers it again:
//!   the inbox recognises it and the totals do not change.
//!
//! Tables and topics carry a per-run id, so reruns do not disturb each other. The program
//! checks its outcome against the orders table and exits non-zero if it is wrong.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tidemill::sql::inbox::{Inbox, InboxTx};
use tidemill::sql::outbox::{Forwarder, Outbox};
use tidemill::sql::sqlx;
use tidemill::sql::{SqlConfig, SqlPublisher, SqlSubscriber};
use tidemill::{permanent, BoxError, BrokerConfig, BrokerKind, HandlerResult, Message, Router};
use tower::ServiceExt;

const ORDERS: usize = 40;
const CUSTOMERS: usize = 5;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order: String,
    customer: String,
    total: i64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = tokio::time::timeout(Duration::from_secs(120), run())
        .await
        .unwrap_or_else(|_| Err("did not finish within 120 s".into()));
    match outcome {
        Ok(()) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outbox example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `inner`, except that the first time it handles order `o-0` the ack is "lost" after the
/// inbox committed: an error as a dropped broker connection would give, so the broker
/// delivers the event again.
fn with_a_lost_ack<S>(
    inner: S,
) -> impl tower::Service<
    Message,
    Response = Vec<Message>,
    Error = BoxError,
    Future = futures::future::BoxFuture<'static, Result<Vec<Message>, BoxError>>,
> + Clone
       + Send
       + 'static
where
    S: tower::Service<Message, Response = Vec<Message>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let lost = Arc::new(AtomicBool::new(false));
    tower::service_fn(move |msg: Message| {
        let (inner, lost) = (inner.clone(), lost.clone());
        Box::pin(async move {
            let first_order = serde_json::from_slice::<OrderPlaced>(msg.payload())
                .map(|e| e.order == "o-0")
                .unwrap_or(false);
            let out = inner.oneshot(msg).await?;
            if first_order && !lost.swap(true, Ordering::SeqCst) {
                return Err("connection to the broker lost before the ack".into());
            }
            Ok(out)
        }) as futures::future::BoxFuture<'static, Result<Vec<Message>, BoxError>>
    })
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let broker_config = BrokerConfig::from_env()?;
    let database = std::env::var("TIDEMILL_POSTGRES_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .ok()
        .or_else(|| {
            (broker_config.kind() == BrokerKind::Postgres)
                .then(|| std::env::var("TIDEMILL_BROKER").ok())
                .flatten()
        })
        .ok_or(
            "set TIDEMILL_POSTGRES_URL (or DATABASE_URL) to the database of the order service",
        )?;
    println!("broker: {:?}", broker_config.kind());
    let broker = broker_config.connect().await?;
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let events = format!("orders-{run_id}");

    // The order service's database: its tables, and the outbox in it.
    let sql = SqlConfig::new(database);
    let outbox = Outbox::new(SqlPublisher::connect(sql.clone()).await?)
        .with_topic(format!("outbox-{run_id}"));
    let db = outbox.pool().clone();
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS example_orders (
             run TEXT NOT NULL, id TEXT NOT NULL, customer TEXT NOT NULL, total BIGINT NOT NULL,
             PRIMARY KEY (run, id));
         CREATE TABLE IF NOT EXISTS example_customer_totals (
             run TEXT NOT NULL, customer TEXT NOT NULL, orders BIGINT NOT NULL, total BIGINT NOT NULL,
             PRIMARY KEY (run, customer));",
    )
    .execute(&db)
    .await?;
    let run = run_id.to_string();

    // --- the example's core -------------------------------------------------------------
    let router = Router::new();
    // Relays the outbox to the broker.
    Forwarder::new(
        SqlSubscriber::connect(sql.clone()).await?,
        outbox.topic(),
        broker.publisher.clone(),
    )
    .with_group(format!("forwarder-{run_id}"))
    .register(&router)
    .await?;
    // The projection: exactly one effect per event, whatever the broker redelivers.
    let inbox = Inbox::new(db.clone(), format!("customer-totals-{run_id}"))?;
    let projection_run = run.clone();
    router
        .add_handler("customer-totals")
        .subscribe(broker.subscriber.clone(), &events)
        .group(format!("customer-totals-{run_id}"))
        .service(with_a_lost_ack(inbox.handler(
            move |msg: Message, mut tx: InboxTx| {
                let run = projection_run.clone();
                async move {
                    let event: OrderPlaced = serde_json::from_slice(msg.payload())
                        .map_err(|e| permanent(format!("not an OrderPlaced event: {e}")))?;
                    sqlx::query(
                        "INSERT INTO example_customer_totals (run, customer, orders, total)
                     VALUES ($1, $2, 1, $3)
                     ON CONFLICT (run, customer) DO UPDATE
                     SET orders = example_customer_totals.orders + 1,
                         total = example_customer_totals.total + EXCLUDED.total",
                    )
                    .bind(&run)
                    .bind(&event.customer)
                    .bind(event.total)
                    .execute(&mut *tx)
                    .await?;
                    HandlerResult::Ok((tx, ()))
                }
            },
        )))
        .await?;
    // --- end of the core ----------------------------------------------------------------

    let running = router.clone();
    let router_task = tokio::spawn(async move { running.run().await });
    tokio::time::timeout(Duration::from_secs(60), router.running())
        .await
        .map_err(|_| "the router did not start within 60 s")?;

    // The order service: one transaction per order, the row and the event together.
    let mut declined = 0;
    let mut placed = 0;
    for i in 0..ORDERS {
        let event = OrderPlaced {
            order: format!("o-{i}"),
            customer: format!("c-{}", i % CUSTOMERS),
            total: 10 + i as i64,
        };
        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO example_orders (run, id, customer, total) VALUES ($1, $2, $3, $4)",
        )
        .bind(&run)
        .bind(&event.order)
        .bind(&event.customer)
        .bind(event.total)
        .execute(&mut *tx)
        .await?;
        let message = Message::new(serde_json::to_vec(&event)?).with_key(&event.customer);
        outbox.publish_in(&mut tx, &events, vec![message]).await?;
        if i % 10 == 9 {
            // The card was declined after the row was written: nothing of it stays.
            tx.rollback().await?;
            declined += 1;
        } else {
            tx.commit().await?;
            placed += 1;
        }
    }
    println!(
        "order service: {placed} orders committed with their events, {declined} declined (rolled back)"
    );

    // Every committed order counted once.
    let counted = || async {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(orders)::bigint FROM example_customer_totals WHERE run = $1",
        )
        .bind(&run)
        .fetch_one(&db)
        .await
        .map(|n| n.unwrap_or(0))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while counted().await? < placed {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {placed} events reached the projection within 60 s",
                counted().await?
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The event whose ack was "lost" came back and was recognised.
    let deadline = Instant::now() + Duration::from_secs(60);
    while inbox.duplicates() < 1 {
        if Instant::now() > deadline {
            return Err("the redelivered event was not handled within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    router.close().await?;
    router_task.await??;
    broker.publisher.close().await?;

    // The projection matches the orders table: committed orders only, each once.
    let expected: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT customer, count(*)::bigint, sum(total)::bigint FROM example_orders
         WHERE run = $1 GROUP BY customer ORDER BY customer",
    )
    .bind(&run)
    .fetch_all(&db)
    .await?;
    let projected: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT customer, orders, total FROM example_customer_totals WHERE run = $1 ORDER BY customer",
    )
    .bind(&run)
    .fetch_all(&db)
    .await?;
    println!("projection: {projected:?}");
    println!(
        "summary: {} events handled, {declined} declined orders never published, {} redelivery \
         recognised by the inbox",
        inbox.handled(),
        inbox.duplicates()
    );
    if projected != expected {
        return Err(
            format!("projection {projected:?} differs from the orders {expected:?}").into(),
        );
    }
    if expected.iter().map(|(_, n, _)| n).sum::<i64>() != (ORDERS - declined) as i64 {
        return Err("a declined order reached the orders table".into());
    }
    for table in ["example_orders", "example_customer_totals"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE run = $1"))
            .bind(&run)
            .execute(&db)
            .await?;
    }
    Ok(())
}
