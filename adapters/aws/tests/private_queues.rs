//! Private queues (subscriptions without a consumer group) left behind by a process that
//! ended without deleting them are removed by the next private subscription to the topic.

mod common;

use std::time::Duration;

use common::{aws_url, have_server, ok, region_endpoint, test_config};
use futures::StreamExt;
use tidemill_aws::{SqsPublisher, SqsSubscriber};
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};

async fn sdk_clients() -> (aws_sdk_sqs::Client, aws_sdk_sns::Client) {
    let (region, endpoint) = region_endpoint(&aws_url());
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .endpoint_url(endpoint)
        .load()
        .await;
    (
        aws_sdk_sqs::Client::new(&sdk),
        aws_sdk_sns::Client::new(&sdk),
    )
}

async fn queue_exists(sqs: &aws_sdk_sqs::Client, name: &str) -> bool {
    sqs.get_queue_url().queue_name(name).send().await.is_ok()
}

#[tokio::test]
async fn an_expired_private_queue_is_deleted_and_unsubscribed() {
    if !have_server("an_expired_private_queue_is_deleted_and_unsubscribed") {
        return;
    }
    let (_, endpoint) = region_endpoint(&aws_url());
    let config = test_config(&endpoint);
    let topic = format!("private-expiry-{}", uuid::Uuid::now_v7().simple());
    let (sqs, sns) = sdk_clients().await;

    // What a crashed process leaves behind: a private queue with an old heartbeat, subscribed
    // to the topic, and one whose heartbeat is fresh (another live process).
    let publisher = ok(SqsPublisher::connect(config.clone()).await, "connect");
    ok(
        publisher
            .publish(&topic, vec![Message::new("create the topic")])
            .await,
        "publish",
    );
    let topic_arn = sns
        .create_topic()
        .name(config.topic_name(&topic))
        .send()
        .await
        .expect("create topic")
        .topic_arn()
        .expect("arn")
        .to_owned();
    let mut made = Vec::new();
    for (id, beat) in [
        ("000000000001", "1".to_owned()),
        ("000000000002", now().to_string()),
    ] {
        let (name, _) = config.private_queue_name(&topic, id);
        let url = sqs
            .create_queue()
            .queue_name(&name)
            .tags("tidemill-private", "true")
            .tags("tidemill-heartbeat", beat)
            .send()
            .await
            .expect("create queue")
            .queue_url()
            .expect("url")
            .to_owned();
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("attributes")
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn))
            .cloned()
            .expect("queue arn");
        sns.subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&arn)
            .send()
            .await
            .expect("subscribe");
        made.push((name, arn));
    }

    // A new private subscription to the topic.
    let subscriber = ok(SqsSubscriber::connect(config.clone()).await, "connect");
    let mut stream = ok(
        subscriber.subscribe(&topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    assert!(
        !queue_exists(&sqs, &made[0].0).await,
        "the expired private queue is deleted"
    );
    assert!(
        queue_exists(&sqs, &made[1].0).await,
        "a live private queue is kept"
    );
    let endpoints: Vec<String> = sns
        .list_subscriptions_by_topic()
        .topic_arn(&topic_arn)
        .send()
        .await
        .expect("list subscriptions")
        .subscriptions()
        .iter()
        .filter_map(|s| s.endpoint().map(str::to_owned))
        .collect();
    assert!(
        !endpoints.contains(&made[0].1),
        "its subscription is removed: {endpoints:?}"
    );
    assert!(endpoints.contains(&made[1].1));

    // The new subscription works.
    ok(
        publisher.publish(&topic, vec![Message::new("hello")]).await,
        "publish",
    );
    let delivery = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a delivery within 30 s")
        .expect("stream open")
        .expect("no error");
    assert_eq!(delivery.message().payload().as_ref(), b"hello");
    ok(delivery.ack().await, "ack");
    ok(subscriber.close().await, "close");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
