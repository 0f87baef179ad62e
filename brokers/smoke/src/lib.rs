//! Smoke tests live in `tests/`; see brokers/README.md.
#![forbid(unsafe_code)]
