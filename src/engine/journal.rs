//! The embedded engine's journal: order events and item definitions written to the store
//! with group commit. Callers enqueue and wait; one task takes everything queued at that
//! moment and writes it in one transaction, so requests arriving in the same few
//! milliseconds share one commit (and one fsync) instead of queueing behind each other.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::embedded::Journal;
use crate::clock::Clock;
use crate::domain::ItemSpec;
use crate::domain::OrderEvent;
use crate::error::Error;
use crate::store::Store;

enum Job {
    Events(Vec<OrderEvent>, oneshot::Sender<Result<(), Error>>),
    Item(ItemSpec, oneshot::Sender<Result<(), Error>>),
    /// An item's pause switch (`Some`), or every sale's (`None`).
    Pause(Option<String>, bool, oneshot::Sender<Result<(), Error>>),
}

pub struct SqliteJournal {
    /// Unbounded, so that [`Journal::append`] enqueues at once, under the engine's lock
    /// (what is in flight is bounded by the requests in flight).
    jobs: mpsc::UnboundedSender<Job>,
}

/// Most events one commit takes.
const MAX_GROUP: usize = 4096;

impl SqliteJournal {
    pub fn start(store: Arc<Store>, clock: Clock) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        // The journal runs on a thread and a runtime of its own. A commit is a few round
        // trips to the database's connection thread (acquire, execute, the connection's
        // return to the pool, a task sqlx spawns), and on the server's runtime each answer
        // waited for a worker to come round to it behind the connections' tasks: commits
        // of ~60 events every ~2.5 ms with the CPU a third idle (issue 11, 256 connections).
        // Here the next round trip starts as soon as the last one answers.
        let spawned = std::thread::Builder::new()
            .name("seckill-journal".into())
            .spawn(
                move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(Self::run(rx, store, clock)),
                    Err(e) => tracing::error!(cause = %e, "journal runtime did not start"),
                },
            );
        if let Err(e) = spawned {
            tracing::error!(cause = %e, "journal thread did not start");
        }
        SqliteJournal { jobs }
    }

    /// Take everything queued, commit it as one transaction, answer every waiter; again.
    ///
    /// One commit at a time, in the order the events were enqueued, which is the order the
    /// engine made the changes (it enqueues under its lock): the database always holds a
    /// prefix of the engine's history. Were a later group committed first (two commits at
    /// once), a kill in between could leave a reservation of a unit in the database
    /// without the cancellation that had freed it: an oversold item after the restart
    /// (`tests/embedded_crash.rs` caught exactly that).
    async fn run(mut rx: mpsc::UnboundedReceiver<Job>, store: Arc<Store>, clock: Clock) {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let mut barriers = Vec::new();
            Self::write_group(group, &store, &clock, &mut rx, &mut barriers).await;
            // Everything before them is written, or refused (and undone by its callers).
            for b in barriers {
                let _ = b.send(Ok(()));
            }
        }
    }

    /// One group's jobs, written in the order they were enqueued: runs of events as one
    /// commit each, before the item definition or pause switch that follows them. After a
    /// write left in doubt, the rest of the group is refused like what arrives meanwhile,
    /// and the write is made again until the database answers.
    async fn write_group(
        group: Vec<Job>,
        store: &Store,
        clock: &Clock,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        barriers: &mut Vec<oneshot::Sender<Result<(), Error>>>,
    ) {
        let mut jobs = group.into_iter();
        let mut events = Vec::new();
        let mut waiters = Vec::new();
        loop {
            let job = jobs.next();
            if !matches!(job, Some(Job::Events(..))) && !events.is_empty() {
                if Self::commit(store, &events, std::mem::take(&mut waiters)).await {
                    Self::refuse(job.into_iter().chain(jobs), barriers);
                    let what = format!("{} events", events.len());
                    Self::write_until_answered(&what, rx, barriers, || store.apply(&events)).await;
                    return;
                }
                events.clear();
            }
            match job {
                None => return,
                Some(Job::Events(evs, done)) if evs.is_empty() => barriers.push(done),
                Some(Job::Events(evs, done)) => {
                    events.extend(evs);
                    waiters.push(done);
                }
                // An item's definition or pause switch left in doubt is kept by the engine,
                // like a commit of events.
                Some(Job::Item(spec, done)) => {
                    let put = || store.put_item(&spec, clock.now_ms());
                    if Self::answer(done, put().await) {
                        Self::refuse(jobs, barriers);
                        let what = format!("item {}", spec.item_id);
                        Self::write_until_answered(&what, rx, barriers, put).await;
                        return;
                    }
                }
                Some(Job::Pause(item, paused, done)) => {
                    let set = || async {
                        store
                            .set_paused(item.as_deref(), paused, clock.now_ms())
                            .await
                            .map(|_| ())
                    };
                    if Self::answer(done, set().await) {
                        Self::refuse(jobs, barriers);
                        let what = format!("pause switch of {}", item.as_deref().unwrap_or("every sale"));
                        Self::write_until_answered(&what, rx, barriers, set).await;
                        return;
                    }
                }
            }
        }
    }

    /// Refuse `jobs`, answered without being written (a write before them is in doubt):
    /// nothing of them was sent, so their callers undo them. A barrier joins `barriers`,
    /// answered once the write in doubt before it is done.
    fn refuse(jobs: impl Iterator<Item = Job>, barriers: &mut Vec<oneshot::Sender<Result<(), Error>>>) {
        for job in jobs {
            let done = match job {
                Job::Events(evs, done) if evs.is_empty() => {
                    barriers.push(done);
                    continue;
                }
                Job::Events(_, done) | Job::Item(_, done) | Job::Pause(_, _, done) => done,
            };
            let _ = done.send(Err(Error::Store(
                "not written: an earlier commit's outcome is unknown and is being written again".into(),
            )));
        }
    }

    /// Send a job's outcome to its waiter; true when it is unknown ([`in_doubt`]).
    fn answer(done: oneshot::Sender<Result<(), Error>>, outcome: Result<(), Error>) -> bool {
        let unknown = in_doubt(&outcome);
        let _ = done.send(outcome);
        unknown
    }

    /// A write left in doubt (its waiters were told so and keep their changes): `write` it
    /// again until the database takes it. Every write is an upsert (the events' forward-only),
    /// so a second write of what the first one applied changes nothing. Until then every job
    /// that arrives is refused at once: nothing of it was sent, so its caller can undo it,
    /// and the database still holds a prefix of the engine's history. A barrier (no events)
    /// joins `barriers` instead, answered once the write is done.
    async fn write_until_answered<T, F>(
        what: &str,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        barriers: &mut Vec<oneshot::Sender<Result<(), Error>>>,
        mut write: impl FnMut() -> F,
    ) where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        let mut delays = crate::retry::backoff();
        let mut open = true;
        loop {
            let pause = tokio::time::sleep(delays.next().unwrap_or(crate::retry::MAX_DELAY));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    job = rx.recv(), if open => match job {
                        Some(job) => Self::refuse(std::iter::once(job), barriers),
                        None => open = false,
                    },
                }
            }
            match write().await {
                Ok(_) => {
                    tracing::info!(what, "journal write whose outcome was unknown: written");
                    return;
                }
                // Refused too (a full disk, say): the engine holds the changes and answered
                // nobody 200 for them, so they are written once the database takes them, as
                // the persistence worker does with a batch.
                Err(e) => {
                    tracing::warn!(cause = %e, what, "journal write whose outcome is unknown: writing it again");
                }
            }
        }
    }

    /// One group's commit: SQLite, a WAL append without fsync (checkpoints run beside it,
    /// see `store::checkpointer`); PostgreSQL, a transaction that waits for its WAL flush.
    /// Every waiter gets the outcome; true when it is unknown ([`in_doubt`]).
    async fn commit(store: &Store, events: &[OrderEvent], waiters: Vec<oneshot::Sender<Result<(), Error>>>) -> bool {
        let started = std::time::Instant::now();
        let result = store.apply(events).await;
        let took = started.elapsed();
        if took > std::time::Duration::from_millis(100) {
            tracing::warn!(
                events = events.len(),
                took_ms = took.as_millis() as u64,
                "slow journal commit"
            );
        }
        metrics::histogram!(crate::metrics::PERSIST_BATCH_SIZE).record(events.len() as f64);
        if let Err(e) = &result {
            tracing::warn!(cause = %e, events = events.len(), "journal commit failed");
        }
        for w in waiters {
            let _ = w.send(match &result {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            });
        }
        in_doubt(&result)
    }

    /// Enqueue now; the future resolves once the job is done.
    fn submit(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Job,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.jobs.send(job(tx));
        Box::pin(async move {
            sent.map_err(|_| Error::Internal("journal stopped".into()))?;
            rx.await.map_err(|_| Error::Internal("journal stopped".into()))?
        })
    }
}

/// Whether a write's outcome is unknown: it may or may not have been applied
/// ([`Error::StoreInDoubt`]), so it is written again rather than undone.
fn in_doubt<T>(outcome: &Result<T, Error>) -> bool {
    matches!(outcome, Err(Error::StoreInDoubt(_)))
}

impl Journal for SqliteJournal {
    fn append(&self, events: Vec<OrderEvent>) -> BoxFuture<'static, Result<(), Error>> {
        self.submit(move |tx| Job::Events(events, tx))
    }

    fn put_item(&self, spec: ItemSpec) -> BoxFuture<'static, Result<(), Error>> {
        self.submit(move |tx| Job::Item(spec, tx))
    }

    fn set_paused(&self, item_id: Option<String>, paused: bool) -> BoxFuture<'static, Result<(), Error>> {
        self.submit(move |tx| Job::Pause(item_id, paused, tx))
    }
}
