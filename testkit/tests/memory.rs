//! The conformance suite against the embedded in-memory broker, with and without retention.

mod memory {
    tidemill_testkit::conformance_tests!(tidemill_testkit::MemoryBackend::new(
        tidemill_core::MemoryConfig::default()
    ));
}

mod memory_with_retention {
    tidemill_testkit::conformance_tests!(tidemill_testkit::MemoryBackend::new(
        tidemill_core::MemoryConfig {
            retention: 1_000,
            ..Default::default()
        }
    ));
}
