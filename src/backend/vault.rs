//! The `vault` backend: not yet built (see the open backend issues).
