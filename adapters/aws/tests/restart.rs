//! Across a restart of the shared local AWS API (`brokers/brokers.sh restart aws`, what
//! `make brokers-restart NAME=aws` runs). moto keeps everything in memory, so a restart
//! loses every topic, queue, subscription and message: a subscriber that stays subscribed
//! (with a group, and without one: a private queue) makes its topic, queues and
//! subscriptions again, the publisher its topic, and messages published once the queues are
//! subscribed again are delivered; in queue mode the publisher makes the queue again, so
//! nothing published after the restart is lost.
//!
//! Restarting breaks every other test using the emulator, so these are `#[ignore]`d;
//! `make test` runs ignored tests after the others, one at a time. Skipped when
//! `TIDEMILL_AWS_URL` is unset or names an external endpoint (which is not restarted).

mod common;

use common::{
    have_server, keeps_working_after_losing_state, queue_mode_keeps_working_after_losing_state,
    restart_aws, runtime,
};

#[test]
#[ignore = "restarts the shared aws broker; run by make test one at a time"]
fn publisher_and_subscriber_keep_working_across_a_restart() {
    if !have_server("publisher_and_subscriber_keep_working_across_a_restart") {
        return;
    }
    runtime().block_on(keeps_working_after_losing_state(
        "aws_restart",
        |_, _, _| restart_aws(),
    ));
}

#[test]
#[ignore = "restarts the shared aws broker; run by make test one at a time"]
fn queue_mode_publisher_and_subscriber_keep_working_across_a_restart() {
    if !have_server("queue_mode_publisher_and_subscriber_keep_working_across_a_restart") {
        return;
    }
    runtime().block_on(queue_mode_keeps_working_after_losing_state(
        "aws_restart_queue",
        |_, _| restart_aws(),
    ));
}
