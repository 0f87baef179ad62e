//! tidemill-middleware (work in progress)
