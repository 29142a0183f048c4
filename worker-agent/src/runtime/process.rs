//! The `process` runtime (next slice).
