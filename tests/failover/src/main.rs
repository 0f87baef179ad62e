//! The processes of the failover tests (see the crate's lib docs and tests/):
//!
//! ```text
//! tidemill-failover consume URL TOPIC GROUP FILE [CONCURRENCY]
//! tidemill-failover produce URL TOPIC FILE COUNT KEYS BATCH [PAUSE_MS]
//! ```
//!
//! `consume` runs a router handler in consumer group GROUP that appends `id key seq nanos
//! pid` to FILE and syncs it before the message is acked, until SIGTERM (or SIGKILL). It
//! prints `ready` once subscribed. `produce` publishes COUNT messages with KEYS keys in
//! batches of BATCH (pausing PAUSE_MS between batches) and appends `id key seq nanos` of
//! every confirmed message to FILE (nanos: when the publish returned), synced; it prints
//! `done` at the end. A batch whose publish
//! fails is retried until confirmed (at-least-once publishing, as documented).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemill::{BrokerConfig, HandlerResult, Message, Router, RouterConfig};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("consume") if args.len() >= 5 => consume(&args[1..]).await,
        Some("produce") if args.len() >= 7 => produce(&args[1..]).await,
        _ => Err(
            "usage: tidemill-failover consume URL TOPIC GROUP FILE [CONCURRENCY] | \
             produce URL TOPIC FILE COUNT KEYS BATCH [PAUSE_MS]"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("tidemill-failover: {e}");
        std::process::exit(1);
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn consume(args: &[String]) -> Result<(), Failure> {
    let (url, topic, group, file) = (&args[0], &args[1], &args[2], &args[3]);
    let concurrency: usize = args.get(4).map_or(Ok(1), |c| c.parse())?;
    let broker = BrokerConfig::from_url(url)?.connect().await?;
    let out = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)?,
    ));
    let pid = std::process::id();
    let router = Router::with_config(RouterConfig {
        close_timeout: Duration::from_secs(10),
        ..RouterConfig::default()
    });
    router
        .add_handler("failover")
        .subscribe(broker.subscriber.clone(), topic.as_str())
        .group(group.as_str())
        .concurrency(concurrency)
        .handler(move |m: Message| {
            let out = out.clone();
            async move {
                let key = m.key_str().unwrap_or("-").to_owned();
                let seq = m.metadata().get("seq").unwrap_or("0").to_owned();
                let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
                let line = format!("{} {key} {seq} {at} {pid}\n", m.uuid());
                // Recorded and synced before the ack: a crash after this line duplicates,
                // never loses.
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let mut f = out.lock().unwrap_or_else(|p| p.into_inner());
                    f.write_all(line.as_bytes())?;
                    f.sync_data()
                })
                .await??;
                HandlerResult::Ok(())
            }
        })
        .await?;
    router.close_on_signals();
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    println!("ready");
    std::io::stdout().flush()?;
    run.await??;
    Ok(())
}

async fn produce(args: &[String]) -> Result<(), Failure> {
    let (url, topic, file) = (&args[0], &args[1], &args[2]);
    let count: u64 = args[3].parse()?;
    let keys: u64 = args[4].parse()?;
    let batch: u64 = args[5].parse()?;
    let pause = Duration::from_millis(args.get(6).map_or(Ok(0), |p| p.parse())?);
    let broker = BrokerConfig::from_url(url)?.connect().await?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    let mut seq_of_key = vec![0u64; usize::try_from(keys.max(1))?];
    let mut n = 0;
    while n < count {
        let mut messages = Vec::new();
        let mut lines = String::new();
        for i in n..(n + batch).min(count) {
            let k = usize::try_from(i % keys.max(1))?;
            seq_of_key[k] += 1;
            let key = format!("k{k}");
            let id = format!("m-{i}");
            lines.push_str(&format!("{id} {key} {}\n", seq_of_key[k]));
            messages.push(
                Message::with_uuid(id, format!("payload {i}"))
                    .with_key(&key)
                    .with_metadata("seq", seq_of_key[k]),
            );
        }
        let sent = messages.len() as u64;
        loop {
            match broker.publisher.publish(topic, messages.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    eprintln!("produce: publish failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let lines: String = lines.lines().map(|l| format!("{l} {at}\n")).collect();
        out.write_all(lines.as_bytes())?;
        out.sync_data()?;
        n += sent;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    broker.publisher.close().await?;
    println!("done");
    std::io::stdout().flush()?;
    Ok(())
}
