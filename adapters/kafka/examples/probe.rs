use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::time::Duration;
#[tokio::main]
async fn main() {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9093").create().unwrap();
    let topic = format!("probe-parts-{}", uuid::Uuid::new_v4().simple());
    println!("{:?}", admin.create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new()).await);
    println!("{:?}", admin.create_partitions(&[NewPartitions::new(&topic, 3)], &AdminOptions::new().request_timeout(Some(Duration::from_secs(5)))).await);
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9093").create().unwrap();
    let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).unwrap();
    println!("partitions now {}", md.topics()[0].partitions().len());
}
