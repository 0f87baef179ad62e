//! tidemill-googlecloud (work in progress)
