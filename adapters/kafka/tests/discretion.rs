//! Secrets in the configuration never show: not in `Debug`, not in errors, not in log lines
//! (the adapter's own and librdkafka's, at debug level with every librdkafka debug context
//! on). A test binary of its own: it installs a process-wide log collector.
//!
//! Against the Kafka-protocol broker of brokers (`TIDEMILL_KAFKA_BROKERS`), which
//! does not speak SASL: the clients try to authenticate and fail, logging as they go.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemill_core::{Message, Publisher};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber};

const PASSWORD: &str = "hunter2-sasl-pw";
const BROKER_PASSWORD: &str = "broker-userinfo-pw";

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<u8>>>);

impl Write for Collected {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_show_in_debug_errors_or_logs() {
    let Ok(brokers) = std::env::var("TIDEMILL_KAFKA_BROKERS") else {
        eprintln!("SKIP: TIDEMILL_KAFKA_BROKERS is not set (no broker to test against)");
        return;
    };
    let logs = Collected::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let mut c = KafkaConfig::new(format!("{brokers},app:{BROKER_PASSWORD}@{brokers}"));
    c.connect_timeout = Duration::from_secs(3);
    c.publish_timeout = Duration::from_secs(3);
    for (k, v) in [
        ("security.protocol", "sasl_plaintext"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", "app"),
        ("sasl.password", PASSWORD),
        ("debug", "all"),
    ] {
        c.properties.insert(k.into(), v.into());
    }
    let secrets = [PASSWORD, BROKER_PASSWORD];
    let check = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows a secret: {text}");
        }
    };

    check("Debug", &format!("{c:?}"));
    let mut errors = Vec::new();
    match KafkaPublisher::connect(c.clone()).await {
        Ok(p) => {
            if let Err(e) = p.publish_one("discretion", Message::new("x")).await {
                errors.push(e.to_string());
            }
            let _ = p.close().await;
        }
        Err(e) => errors.push(e.to_string()),
    }
    if let Err(e) = KafkaSubscriber::connect(c.clone()).await {
        errors.push(e.to_string());
    }
    // A setting librdkafka refuses while quoting its value (here the password).
    let mut bad = c.clone();
    bad.consumer_properties
        .insert("sasl.oauthbearer.method".into(), PASSWORD.into());
    if let Err(e) = KafkaSubscriber::connect(bad).await {
        errors.push(e.to_string());
    }
    assert!(!errors.is_empty(), "a broker without SASL fails somewhere");
    for e in &errors {
        check("an error", e);
    }
    // librdkafka keeps logging from its own threads for a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("librdkafka"),
        "librdkafka's debug lines were collected ({} bytes)",
        text.len()
    );
    check("the logs", &text);
    if let Ok(path) = std::env::var("DISCRETION_LOG") {
        std::fs::write(path, &text).unwrap();
    }
    eprintln!(
        "checked {} bytes of logs and these errors: {errors:#?}",
        text.len()
    );
}
