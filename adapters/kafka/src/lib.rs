//! tidemill-kafka (work in progress)
