//! Node identity: how a data plane names itself to the control plane and in
//! usage events, traces and logs.

/// The host name, the default `data_plane.node_id`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "aigw-node".into())
}
