//! Observability on the Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`): one trace across two
//! hops (trace context in message attributes). Health through a fault proxy is not
//! checked here: the client retries a cut connection inside the streaming pull without
//! telling, so the subscriber reports down only while a pull that failed is re-opened.

use std::sync::Arc;

use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};

#[tokio::test]
async fn one_trace_across_two_hops() {
    let Ok(host) = std::env::var("PUBSUB_EMULATOR_HOST") else {
        eprintln!("SKIP one_trace_across_two_hops: PUBSUB_EMULATOR_HOST is not set");
        return;
    };
    let config = GoogleCloudConfig::emulator("tidemill-test", host);
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::one_trace_across_two_hops(Arc::new(p), Arc::new(s), "gcp_pubsub").await;
}
