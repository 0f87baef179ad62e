//! Raw async-nats vs Tidemill (in progress).
fn main() {}
