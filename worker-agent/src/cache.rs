//! The code cache (next slice).
