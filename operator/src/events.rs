//! Events go out one at a time, in the order published, from a queue: as
//! client-go's broadcaster sends them. Sent side by side, a fan-out's
//! Events (one per branch) competed with its status writes for the API
//! server's CPU; queued, they take one request's share of it at a time.

use std::future::Future;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

use crate::error::ErrorChain;

/// How many Events may wait; beyond that they are dropped (and logged), as
/// client-go drops them, rather than holding memory while the API server
/// is away.
pub const QUEUE_CAPACITY: usize = 1024;

/// An Event and the object it is about.
pub struct Pending {
    pub event: Event,
    pub reference: ObjectReference,
    /// The object's name, for the log.
    pub name: String,
}

/// The sending end of a queue whose items one task hands to a sink in turn.
#[derive(Clone)]
pub struct Queue<T> {
    sender: mpsc::Sender<T>,
}

impl<T: Send + 'static> Queue<T> {
    /// Starts the task that hands each item to `sink` once the previous
    /// one's future is done; it ends when every `Queue` handle is dropped.
    pub fn start<F, Fut>(capacity: usize, mut sink: F) -> Self
    where
        F: FnMut(T) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (sender, mut receiver) = mpsc::channel(capacity);
        tokio::spawn(async move {
            while let Some(item) = receiver.recv().await {
                sink(item).await;
            }
        });
        Self { sender }
    }

    /// Queues `item`; gives it back when the queue is full or its task gone.
    pub fn push(&self, item: T) -> Result<(), T> {
        self.sender.try_send(item).map_err(|err| match err {
            mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item) => item,
        })
    }
}

/// A queue that publishes Events through `recorder`.
pub fn event_queue(recorder: Recorder) -> Queue<Pending> {
    Queue::start(QUEUE_CAPACITY, move |pending: Pending| {
        let recorder = recorder.clone();
        async move { send(&recorder, pending).await }
    })
}

/// Publishes one Event; failing to is only logged.
pub async fn send(recorder: &Recorder, pending: Pending) {
    if let Err(err) = recorder.publish(&pending.event, &pending.reference).await {
        tracing::warn!(object = %pending.name, reason = pending.event.reason, error = %ErrorChain(&err), "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn items_are_sent_one_at_a_time_in_order() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let queue = {
            let (in_flight, most_in_flight, sent) =
                (in_flight.clone(), most_in_flight.clone(), sent.clone());
            Queue::start(64, move |item: u32| {
                let (in_flight, most_in_flight, sent) =
                    (in_flight.clone(), most_in_flight.clone(), sent.clone());
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    sent.lock().unwrap().push(item);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            })
        };
        for item in 0..20 {
            assert!(queue.push(item).is_ok());
        }
        for _ in 0..500 {
            if sent.lock().unwrap().len() == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*sent.lock().unwrap(), (0..20).collect::<Vec<_>>());
        assert_eq!(most_in_flight.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_full_queue_gives_the_item_back() {
        let taken = Arc::new(tokio::sync::Notify::new());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let queue = {
            let taken = taken.clone();
            Queue::start(1, move |_: u32| {
                let (taken, released) = (taken.clone(), released.clone());
                async move {
                    taken.notify_one();
                    // The first item holds the task until the test lets it go.
                    if let Some(released) = released.lock().await.take() {
                        let _ = released.await;
                    }
                }
            })
        };
        assert_eq!(queue.push(1), Ok(()));
        taken.notified().await;
        // The task holds the first item; the second fills the one slot.
        assert_eq!(queue.push(2), Ok(()));
        assert_eq!(queue.push(3), Err(3));
        let _ = release.send(());
    }
}
