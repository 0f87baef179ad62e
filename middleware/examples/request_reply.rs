//! Request-reply on the in-memory broker. Run:
//! `cargo run -p tidemill-middleware --example request_reply`
//!
//! A price service answers requests through the `Replier` layer; a `Requester` asks it for
//! prices (concurrently, over one reply subscription), gets a typed error for an unknown
//! product, streams a multi-part answer, and times out on a topic nobody serves.

use std::time::Duration;

use futures::StreamExt;
use tidemill_core::{permanent, HandlerResult, MemoryBroker, Message, Router};
use tidemill_middleware::request_reply::{Replier, RequestError, Requester, RequesterConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("prices")
        .subscribe(broker.subscriber(), "prices")
        .group("prices")
        .concurrency(8)
        .layer(Replier::new(broker.publisher()))
        .handler(|req: Message| async move {
            let product = String::from_utf8_lossy(req.payload()).into_owned();
            let cents = match product.as_str() {
                "tea" => 350,
                "coffee" => 420,
                "catalogue" => {
                    // Several replies: the requester streams them.
                    return HandlerResult::Ok(vec![
                        Message::new("tea 3.50"),
                        Message::new("coffee 4.20"),
                    ]);
                }
                _ => return Err(permanent(format!("unknown product `{product}`"))),
            };
            HandlerResult::Ok(vec![
                Message::new(cents.to_string()).with_metadata("currency", "EUR")
            ])
        })
        .await?;
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let requester = Requester::connect(
        broker.publisher(),
        broker.subscriber(),
        RequesterConfig::default().timeout(Duration::from_secs(5)),
    )
    .await?;
    println!("replies come back on {}", requester.reply_topic());

    let (tea, coffee) = tokio::join!(
        requester.request("prices", Message::new("tea")),
        requester.request("prices", Message::new("coffee")),
    );
    for (name, reply) in [("tea", tea?), ("coffee", coffee?)] {
        println!(
            "{name}: {} cents ({})",
            String::from_utf8_lossy(reply.payload()),
            reply.metadata().get("currency").unwrap_or("?")
        );
    }

    match requester.request("prices", Message::new("caviar")).await {
        Err(e @ RequestError::Handler { .. }) => {
            println!("caviar: {e} (permanent: {})", e.is_permanent())
        }
        other => println!("caviar: unexpected {other:?}"),
    }

    let mut catalogue = requester
        .request_stream("prices", Message::new("catalogue"))
        .await?;
    while let Some(part) = catalogue.next().await {
        println!("catalogue: {}", String::from_utf8_lossy(part?.payload()));
    }

    match requester
        .request_timeout(
            "nobody-listens",
            Message::new("hello?"),
            Duration::from_millis(300),
        )
        .await
    {
        Err(e @ RequestError::Timeout { .. }) => println!("nobody-listens: {e}"),
        other => println!("nobody-listens: unexpected {other:?}"),
    }

    requester.close().await;
    router.close().await?;
    run.await??;
    Ok(())
}
