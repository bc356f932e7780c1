//! aigw data plane (built in its own issue).
