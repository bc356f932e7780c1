//! The node's stop signal, as background tasks wait on it.

use tokio::sync::watch;

/// Resolves once `stop` flips to true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
