//! Natural batching of reservations, per shard. While a shard's reserve calls are in flight
//! (at most [`MAX_CALLS_IN_FLIGHT`]), the next reservations of that shard queue up; when a
//! call returns, everything queued (up to [`MAX_BATCH`]) goes as the next call. There is no
//! timer: at low load a batch is one request and nothing waits; at high load the batch grows
//! by itself, and Redis pays its per-call cost once per batch instead of once per
//! reservation. More than one call in flight keeps Redis busy while the gateway hands out
//! the replies of the last one (with one, Redis idled between calls and a hot item sold at
//! less than half the rate).
//!
//! Each request still gets its own reply, decided in queue order (the script decides the
//! requests of a batch one after the other, and one request's failed check changes nothing
//! for the others). A batch call that fails fails every request in it, as a single call
//! would have.
//!
//! One task per shard drives its queue; it is started on the shard's first reservation and
//! ends when the engine (the queue's sender) is dropped. Reservations in flight — queued or
//! in a call, over every shard — are capped (`SECKILL_MAX_INFLIGHT`): one more is shed with
//! 503 at once rather than wait without bound.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{ReserveCmd, ReserveReply};
use crate::error::Error;
use crate::ids::{SHARDS, shard_of};

/// Most reservations one script call decides.
pub const MAX_BATCH: usize = 64;

/// Calls of one shard in flight at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 4;

/// Makes the call for one batch: all of its commands are of one shard.
pub trait BatchCall: Clone + Send + Sync + 'static {
    /// One reply per command, in order; `Err` fails the whole batch. `since`: when the
    /// oldest of them was queued (the time their requests have taken counts from there).
    fn call(
        &self,
        cmds: &[ReserveCmd],
        since: Instant,
    ) -> impl Future<Output = Result<Vec<ReserveReply>, Error>> + Send;
}

struct Job {
    cmd: ReserveCmd,
    reply: oneshot::Sender<Result<ReserveReply, Error>>,
    queued: Instant,
}

pub struct Batches<C: BatchCall> {
    shards: Vec<OnceLock<mpsc::Sender<Job>>>,
    call: C,
    /// Permits for reservations in flight, queued or in a call; `try_acquire`, never wait.
    inflight: Semaphore,
    max_inflight: usize,
}

impl<C: BatchCall> Batches<C> {
    pub fn new(call: C, max_inflight: usize) -> Self {
        let max_inflight = max_inflight.max(1);
        Batches {
            shards: (0..SHARDS).map(|_| OnceLock::new()).collect(),
            call,
            inflight: Semaphore::new(max_inflight),
            max_inflight,
        }
    }

    /// The call, to finish setting it up: only before the first reservation (each shard's
    /// task takes a clone of it when it starts).
    pub fn call_mut(&mut self) -> &mut C {
        &mut self.call
    }

    /// Queue a reservation behind the shard's call in flight and wait for its reply. Once
    /// queued it is decided whether or not this future is still awaited: the call runs in
    /// a task of its own.
    pub async fn reserve(&self, cmd: ReserveCmd) -> Result<ReserveReply, Error> {
        let _permit = self.inflight.try_acquire().map_err(|_| Error::Shed)?;
        let shard = shard_of(&cmd.item_id) as usize;
        let queue = self.shards[shard].get_or_init(|| {
            // Never full: no more than `max_inflight` requests exist at once.
            let (tx, rx) = mpsc::channel(self.max_inflight);
            tokio::spawn(drive(self.call.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let queued = Instant::now();
        queue.try_send(Job { cmd, reply, queued }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Shed,
            mpsc::error::TrySendError::Closed(_) => Error::Internal("reserve queue closed".into()),
        })?;
        answer
            .await
            .map_err(|_| Error::Internal("reserve batch dropped".into()))?
    }
}

/// A shard's driver: take what queued up, make one call, hand out the replies; up to
/// [`MAX_CALLS_IN_FLIGHT`] calls at once.
async fn drive<C: BatchCall>(call: C, mut queue: mpsc::Receiver<Job>) {
    let mut calls = tokio::task::JoinSet::new();
    loop {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        tokio::select! {
            taken = queue.recv_many(&mut jobs, MAX_BATCH), if calls.len() < MAX_CALLS_IN_FLIGHT => {
                if taken == 0 {
                    break;
                }
                calls.spawn(decide(call.clone(), jobs));
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
    while calls.join_next().await.is_some() {}
}

/// One call for a batch; every job gets its reply (or the call's failure).
async fn decide<C: BatchCall>(call: C, jobs: Vec<Job>) {
    let since = jobs.iter().map(|j| j.queued).min().unwrap_or_else(Instant::now);
    let (cmds, waiting): (Vec<ReserveCmd>, Vec<_>) = jobs.into_iter().map(|j| (j.cmd, j.reply)).unzip();
    match call.call(&cmds, since).await {
        Ok(replies) if replies.len() == waiting.len() => {
            for (reply, answer) in waiting.into_iter().zip(replies) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(replies) => {
            let why = format!("reserve batch of {} got {} replies", waiting.len(), replies.len());
            for reply in waiting {
                let _ = reply.send(Err(Error::ScriptReply(why.clone())));
            }
        }
        Err(e) => {
            for reply in waiting {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// Records each batch it is given (and when its oldest request was queued) and answers
    /// after a pause, so callers pile up.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        since: Arc<Mutex<Vec<Instant>>>,
        /// When each call returned.
        ended: Arc<Mutex<Vec<Instant>>>,
        fail: bool,
    }

    impl BatchCall for Recorder {
        async fn call(&self, cmds: &[ReserveCmd], since: Instant) -> Result<Vec<ReserveReply>, Error> {
            self.batches
                .lock()
                .unwrap()
                .push(cmds.iter().map(|c| c.user_id.clone()).collect());
            self.since.lock().unwrap().push(since);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.ended.lock().unwrap().push(Instant::now());
            if self.fail {
                return Err(Error::RedisTimeout);
            }
            Ok(cmds
                .iter()
                .map(|c| ReserveReply::SoldOut {
                    stock: c.user_id.trim_start_matches('u').parse().unwrap(),
                })
                .collect())
        }
    }

    fn cmd(user: usize) -> ReserveCmd {
        ReserveCmd {
            item_id: "phone".into(),
            user_id: format!("u{user}"),
            qty: 1,
            order_id: format!("o{user}"),
            idem_key: None,
            buckets: 1,
        }
    }

    #[tokio::test]
    async fn requests_queued_behind_a_call_go_as_one_batch_in_order_each_with_its_reply() {
        let rec = Recorder::default();
        let batches = Arc::new(Batches::new(rec.clone(), 1024));
        let first = {
            let b = batches.clone();
            tokio::spawn(async move { b.reserve(cmd(0)).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await; // the first call is in flight
        let queued = Instant::now();
        let rest: Vec<_> = (1..=100)
            .map(|u| {
                let b = batches.clone();
                tokio::spawn(async move { b.reserve(cmd(u)).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap(), ReserveReply::SoldOut { stock: 0 });
        for (u, h) in rest.into_iter().enumerate() {
            assert_eq!(
                h.await.unwrap().unwrap(),
                ReserveReply::SoldOut { stock: u as i64 + 1 },
                "each request gets its own reply"
            );
        }
        let seen = rec.batches.lock().unwrap().clone();
        let sizes: Vec<usize> = seen.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, MAX_BATCH, 100 - MAX_BATCH], "{sizes:?}");
        let order: Vec<String> = seen.concat();
        let want: Vec<String> = (0..=100).map(|u| format!("u{u}")).collect();
        assert_eq!(order, want, "decided in queue order");
        // The batch behind the first call says when its oldest request was queued (while
        // that call was in flight), not when its own call began.
        let since = rec.since.lock().unwrap().clone();
        let ended = rec.ended.lock().unwrap().clone();
        assert!(
            since[1] >= queued && since[1] <= ended[0],
            "the second batch's time counts from its queue"
        );
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_request_of_its_batch_and_a_full_queue_sheds() {
        let rec = Recorder {
            fail: true,
            ..Recorder::default()
        };
        let batches = Arc::new(Batches::new(rec, 2));
        let spawn = |u: usize| {
            let b = batches.clone();
            tokio::spawn(async move { b.reserve(cmd(u)).await })
        };
        let first = spawn(0);
        tokio::time::sleep(Duration::from_millis(5)).await; // its call is in flight
        let queued: Vec<_> = (1..=3).map(spawn).collect();
        assert_eq!(first.await.unwrap(), Err(Error::RedisTimeout));
        let answers: Vec<_> = futures_util::future::join_all(queued)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            answers,
            vec![Err(Error::RedisTimeout), Err(Error::Shed), Err(Error::Shed)],
            "one waits (2 in flight at most: the call's and it) and fails with its batch; the rest are shed"
        );
    }
}
