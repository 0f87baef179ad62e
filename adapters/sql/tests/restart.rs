//! Across a restart of the shared PostgreSQL server (`brokers/brokers.sh restart postgres`,
//! what `make brokers-restart NAME=postgres` runs): the conformance `reconnect` test with a
//! real restart, and a consumer group resuming after it with exactly what it had not acked
//! (messages, positions and pending rows are ordinary committed rows).
//!
//! Restarting breaks every other test using the server, so these are `#[ignore]`d;
//! `make test` runs ignored tests after the others, one at a time. Skipped when
//! `TIDEMILL_POSTGRES_URL` is unset or names an external server (which is not restarted).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{features, have_server, ok, postgres_url, restart_postgres, test_config, SqlBackend};
use futures::StreamExt;
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_sql::{SqlPublisher, SqlSubscriber};
use tidemill_testkit::{unique_topic, Backend};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
#[ignore = "restarts the shared postgres broker; run by make test one at a time"]
fn reconnects_across_a_server_restart() {
    if !have_server("reconnects_across_a_server_restart") {
        return;
    }
    tidemill_testkit::run(
        "reconnect",
        || async { SqlBackend::restarting(features(), |_| {}) },
        |b: Arc<dyn Backend>| Box::pin(tidemill_testkit::suite::reconnect(b)),
    );
}

#[test]
#[ignore = "restarts the shared postgres broker; run by make test one at a time"]
fn a_group_resumes_after_a_restart_with_what_it_had_not_acked() {
    if !have_server("a_group_resumes_after_a_restart_with_what_it_had_not_acked") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let topic = unique_topic("sql_restart");
        let config = test_config(&postgres_url());
        let opts = SubscribeOptions::group("resume");
        let p = ok(SqlPublisher::connect(config.clone()).await, "connect");
        let s = ok(SqlSubscriber::connect(config.clone()).await, "connect");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..10)
            .map(|i| Message::new(format!("m{i}")).with_metadata("i", i))
            .collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts.clone()).await, "subscribe");
        let mut acked = Vec::new();
        for _ in 0..4 {
            let d = tokio::time::timeout(LIMIT, stream.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no error");
            acked.push(d.message().uuid().to_owned());
            d.ack().await.expect("ack");
        }
        ok(s.close().await, "close");
        drop(stream);
        if !restart_postgres().await {
            return;
        }
        // The same publisher carries on after the restart (its pool reconnects).
        let s = ok(SqlSubscriber::connect(config.clone()).await, "connect");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let rest: Vec<String> = sent
            .iter()
            .map(|m| m.uuid().to_owned())
            .filter(|u| !acked.contains(u))
            .collect();
        let mut got: Vec<String> = Vec::new();
        while got.len() < rest.len() {
            let d = tokio::time::timeout(LIMIT, stream.next())
                .await
                .expect("the rest in time")
                .expect("stream open")
                .expect("no error");
            got.push(d.message().uuid().to_owned());
            d.ack().await.expect("ack");
        }
        assert_eq!(
            got, rest,
            "after the restart: exactly what was not acked, in order"
        );
        // Nothing acked comes again: the next message is one published now.
        let sentinel = Message::new("sentinel");
        ok(
            p.publish(&topic, vec![sentinel.clone()]).await,
            "publish after the restart",
        );
        let d = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("the sentinel in time")
            .expect("stream open")
            .expect("no error");
        assert_eq!(d.message().uuid(), sentinel.uuid());
        d.ack().await.expect("ack");
        ok(s.close().await, "close");
    });
}
