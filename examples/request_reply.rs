//! Request-reply on the in-memory broker. Run: `cargo run --example request_reply`
//!
//! A price service answers requests through the `Replier` layer; a `Requester` asks it for
//! prices (concurrently, over one reply subscription), gets a typed error for an unknown
//! product, streams a multi-part answer, and times out on a topic nobody serves.
//!
//! The program checks every answer and exits non-zero if one is not what it should be.

use std::time::Duration;

use futures::StreamExt;
use tidemill::middleware::request_reply::{
    Replier, ReplyErrorKind, RequestError, Requester, RequesterConfig,
};
use tidemill::{permanent, HandlerResult, MemoryBroker, Message, Router};

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
    let mut wrong = Vec::new();

    // Two requests at once, over the one reply subscription.
    let (tea, coffee) = tokio::join!(
        requester.request("prices", Message::new("tea")),
        requester.request("prices", Message::new("coffee")),
    );
    for (name, reply, cents) in [("tea", tea?, "350"), ("coffee", coffee?, "420")] {
        let got = String::from_utf8_lossy(reply.payload()).into_owned();
        let currency = reply.metadata().get("currency").unwrap_or("?");
        println!("{name}: {got} cents ({currency})");
        if got != cents || currency != "EUR" {
            wrong.push(format!("{name}: {got} {currency}, expected {cents} EUR"));
        }
    }

    // A handler error comes back typed, not as a timeout.
    match requester.request("prices", Message::new("caviar")).await {
        Err(e @ RequestError::Handler { .. }) => {
            println!("caviar: {e} (permanent: {})", e.is_permanent());
            if !matches!(
                e,
                RequestError::Handler {
                    kind: ReplyErrorKind::Permanent,
                    ..
                }
            ) {
                wrong.push(format!("caviar: {e}, expected a permanent handler error"));
            }
        }
        other => wrong.push(format!("caviar: {other:?}, expected a handler error")),
    }

    // Several replies to one request, streamed.
    let mut catalogue = requester
        .request_stream("prices", Message::new("catalogue"))
        .await?;
    let mut parts = Vec::new();
    while let Some(part) = catalogue.next().await {
        let part = String::from_utf8_lossy(part?.payload()).into_owned();
        println!("catalogue: {part}");
        parts.push(part);
    }
    if parts != ["tea 3.50", "coffee 4.20"] {
        wrong.push(format!("catalogue: {parts:?}, expected tea and coffee"));
    }

    // Nobody serves this topic: a timeout, not a hang.
    match requester
        .request_timeout(
            "nobody-listens",
            Message::new("hello?"),
            Duration::from_millis(300),
        )
        .await
    {
        Err(e @ RequestError::Timeout { .. }) => println!("nobody-listens: {e}"),
        other => wrong.push(format!("nobody-listens: {other:?}, expected a timeout")),
    }

    requester.close().await;
    router.close().await?;
    run.await??;
    if !wrong.is_empty() {
        return Err(format!("unexpected answers: {}", wrong.join("; ")).into());
    }
    println!("ok: every answer as expected");
    Ok(())
}
