//! tidemill-nats (work in progress)
