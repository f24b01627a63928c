//! Waiting for the cluster to reach a state.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

/// What one look found.
pub enum Look<T> {
    /// The wait is over.
    Done(T),
    /// Not yet; says what it saw (shown if the wait times out).
    NotYet(String),
}

/// Looks every 250 ms until `look` is done, for at most `timeout`. Errors
/// count as "not yet" (the API server or an agent may be briefly
/// unavailable); the last one is shown if the wait times out.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut look: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Look<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match look().await {
            Ok(Look::Done(value)) => return Ok(value),
            Ok(Look::NotYet(seen)) => seen,
            Err(err) => format!("error: {err:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
