//! Metrics and health probes over HTTP on 127.0.0.1: what an orchestrator and Prometheus
//! scrape from a Tidemill service.
//!
//! ```text
//! cargo run --example observability                 # serves on 127.0.0.1:9898 until Ctrl-C
//! cargo run --example observability -- --check      # any free port; checks itself, exits
//! curl 127.0.0.1:9898/metrics        # Prometheus text: tidemill_messages_received_total, ...
//! curl 127.0.0.1:9898/health/ready   # 200 when every handler runs and its broker is connected
//! curl 127.0.0.1:9898/health/live    # 200 unless the router closed or a handler died
//! curl 127.0.0.1:9898/health         # Router::health() as JSON
//! ```
//!
//! The metrics come from the `metrics` facade: install a recorder (here
//! `metrics-exporter-prometheus`) before the router starts and every handler records its
//! counters, durations and in-flight gauge; without one the router records nothing. The
//! HTTP server is a few lines of plain tokio to keep the example short; a service would use
//! its web framework (axum, hyper, ...) and call the same two functions.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tidemill::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP response: status line and body.
fn respond(path: &str, router: &Router, metrics: &PrometheusHandle) -> (&'static str, String) {
    let health = router.health();
    match path {
        "/metrics" => ("200 OK", metrics.render()),
        "/health/ready" if health.is_ready() => ("200 OK", format!("{health}\n")),
        "/health/ready" => ("503 Service Unavailable", format!("{health}\n")),
        "/health/live" if health.is_live() => ("200 OK", "live\n".to_owned()),
        "/health/live" => ("503 Service Unavailable", format!("{health}\n")),
        "/health" => (
            "200 OK",
            serde_json::to_string_pretty(&health).unwrap_or_default() + "\n",
        ),
        _ => (
            "404 Not Found",
            "try /metrics, /health/ready, /health/live, /health\n".into(),
        ),
    }
}

async fn serve(listener: TcpListener, router: Router, metrics: PrometheusHandle) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (router, metrics) = (router.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = respond(path, &router, &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

/// GET `path` from the example's own server: status line and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr)
        .await
        .expect("connect to the example");
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let check = std::env::args().any(|a| a == "--check");
    // The recorder first: handlers take their metric handles when they start.
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder)?;

    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("orders")
        .subscribe(broker.subscriber(), "orders")
        .group("billing")
        .handler(|m: Message| async move {
            if m.payload().as_ref() == b"bad" {
                return Err(tidemill::permanent("unreadable order"));
            }
            HandlerResult::Ok(())
        })
        .await?;
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let addr = if check {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:9898"
    };
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, router.clone(), metrics));
    println!("serving http://{addr}/metrics, /health/ready, /health/live and /health");
    for payload in ["tea", "coffee", "bad"] {
        broker
            .publisher()
            .publish_one("orders", Message::new(payload))
            .await?;
    }

    if !check {
        router.close_on_signals();
        run.await??;
        return Ok(());
    }
    // --check: wait until the three messages were handled (the bad one fails and is
    // redelivered with a delay), then read the endpoints and close.
    while router.handler_stats("orders").is_none_or(|s| s.failed == 0) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, ready) = get(addr, "/health/ready").await;
    println!("GET /health/ready → {status}\n{ready}");
    assert!(status.contains("200"), "ready while running");
    let (status, body) = get(addr, "/metrics").await;
    println!("GET /metrics → {status}");
    for line in body.lines().filter(|l| l.starts_with("tidemill_messages")) {
        println!("  {line}");
    }
    assert!(body.contains("tidemill_messages_received_total{handler=\"orders\",topic=\"orders\"}"));
    router.close().await?;
    run.await??;
    let (status, _) = get(addr, "/health/ready").await;
    println!("after close: GET /health/ready → {status}");
    assert!(status.contains("503"), "not ready once closed");
    let (status, _) = get(addr, "/health/live").await;
    assert!(status.contains("503"), "not live once closed");
    println!("observability: OK");
    Ok(())
}
