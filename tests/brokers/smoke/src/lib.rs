//! Smoke tests live in `tests/`; see tests/brokers/README.md.
#![forbid(unsafe_code)]
