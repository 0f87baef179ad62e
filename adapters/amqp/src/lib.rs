//! tidemill-amqp (work in progress)
