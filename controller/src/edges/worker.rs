//! The job loop Nova and Neutron share: jobs arriving together batched, each intent once.
//!
//! An edge ([`Work`]) sorts its jobs three ways ([`Job`]):
//!
//! - [`Job::Batch`]: claimed by its intent key, then gathered with every batched job
//!   that arrives within [`BATCH_WINDOW`] of the first, and handed to [`Work::batch`]
//!   together on a task of its own (one plan places them all);
//! - [`Job::Alone`]: claimed by its key, then run by [`Work::alone`] on a task of its own;
//! - [`Job::Now`]: no intent to claim; handled by [`Work::now`] on the worker's loop
//!   (which must not block).
//!
//! Claiming goes through [`Answers`], the edge's [`AnsweredOnce`] ledger: a key in
//! flight is ignored, a key answered gets its first answer again. [`Core`] holds that
//! ledger with the edge's state and its optional event stream (for tests and
//! benchmarks), and [`Jobs`] is the sending side, which answers a job it cannot hand
//! over (the worker is gone) with a failure rather than leave the engine waiting.
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{AnsweredOnce, ResultSender};
use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};

/// Jobs handed over within this window are gathered into one batch (the engine hands
/// all of a host's resources over in one step; other hosts failing at the same moment
/// follow within milliseconds).
pub const BATCH_WINDOW: Duration = Duration::from_millis(30);

/// One job for a [`Work`]er.
pub enum Job<B, A, N> {
    /// Claimed by the key, then batched with what arrives within [`BATCH_WINDOW`].
    Batch(IntentKey, B),
    /// Claimed by the key, then run on its own.
    Alone(IntentKey, A),
    /// Nothing to claim: handled at once on the worker's loop.
    Now(N),
}

/// What an edge does with its jobs.
pub trait Work: Clone + Send + Sync + 'static {
    /// A job gathered into batches.
    type Batched: Send + 'static;
    /// A job run on its own.
    type Alone: Send + 'static;
    /// A job with no intent, handled on the loop.
    type Now: Send + 'static;

    /// The edge's ledger of intents (claims go through it).
    fn answers(&self) -> &Answers;

    /// Works on one batch (claimed jobs only).
    fn batch(self, batch: Vec<(IntentKey, Self::Batched)>) -> impl Future<Output = ()> + Send;

    /// Works on one job on its own (claimed).
    fn alone(self, key: IntentKey, job: Self::Alone) -> impl Future<Output = ()> + Send;

    /// Handles a job with no intent; must not block the loop.
    fn now(&self, job: Self::Now);
}

/// The job type of a [`Work`]er.
pub type JobOf<W> = Job<<W as Work>::Batched, <W as Work>::Alone, <W as Work>::Now>;

/// Starts `work`'s loop (needs a tokio runtime) and returns the sending side; `stopped`
/// is the reason given for a job that cannot be handed over.
pub fn start<W: Work>(work: W, stopped: &'static str) -> Jobs<W> {
    let (tx, rx) = mpsc::unbounded_channel();
    let results = work.answers().results.clone();
    tokio::spawn(run(work, rx));
    Jobs {
        tx,
        results,
        stopped,
    }
}

async fn run<W: Work>(work: W, mut rx: mpsc::UnboundedReceiver<JobOf<W>>) {
    while let Some(job) = rx.recv().await {
        let mut batch = Vec::new();
        let mut pending = vec![job];
        // Gather what arrives together, so one plan places it all.
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        loop {
            for j in pending.drain(..) {
                match j {
                    Job::Batch(key, item) => {
                        if work.answers().claim(&key) {
                            batch.push((key, item));
                        }
                    }
                    Job::Alone(key, job) => {
                        if work.answers().claim(&key) {
                            let w = work.clone();
                            tokio::spawn(async move { w.alone(key, job).await });
                        }
                    }
                    Job::Now(job) => work.now(job),
                }
            }
            if batch.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(j)) => pending.push(j),
                _ => break,
            }
        }
        if !batch.is_empty() {
            let w = work.clone();
            tokio::spawn(async move { w.batch(batch).await });
        }
    }
}

/// The sending side of a worker.
pub struct Jobs<W: Work> {
    tx: mpsc::UnboundedSender<JobOf<W>>,
    results: ResultSender,
    stopped: &'static str,
}

impl<W: Work> Jobs<W> {
    /// The failure a job gets when the worker is gone.
    fn gone(&self) -> RestoreOutcome {
        RestoreOutcome::Failed {
            reason: self.stopped.into(),
        }
    }

    /// Hands `job` over; if the worker is gone (runtime shutting down), answers
    /// `on_fail` with the worker's reason rather than leave the engine waiting.
    fn send(&self, job: JobOf<W>, on_fail: impl FnOnce(RestoreOutcome) -> Input) {
        if self.tx.send(job).is_err() {
            let _ = self.results.send(on_fail(self.gone()));
        }
    }

    /// Hands over a job about `host` (a host action with `key`).
    pub fn send_host(&self, host: &HostId, key: &IntentKey, job: JobOf<W>) {
        self.send(job, |outcome| Input::HostActionResult {
            host: host.clone(),
            key: key.clone(),
            outcome,
        });
    }

    /// Hands over a job restoring `resource` (with `key`).
    pub fn send_resource(&self, resource: &Resource, key: &IntentKey, job: JobOf<W>) {
        self.send(job, |outcome| Input::RestoreResult {
            resource: resource.clone(),
            key: key.clone(),
            outcome,
        });
    }

    /// Hands over a job nobody waits an answer for (lost if the worker is gone).
    pub fn send_unanswered(&self, job: JobOf<W>) {
        let _ = self.tx.send(job);
    }

    /// Answers the engine directly (a job refused before it reaches the worker).
    pub fn answer(&self, input: Input) {
        let _ = self.results.send(input);
    }
}

/// An edge's ledger of intents and its way back to the engine, shared by its tasks.
#[derive(Clone)]
pub struct Answers {
    once: Arc<Mutex<AnsweredOnce>>,
    results: ResultSender,
}

impl Answers {
    /// A ledger answering on `results`.
    pub fn new(results: ResultSender) -> Self {
        Answers {
            once: Arc::default(),
            results,
        }
    }

    /// Claims `key`: false if it is in flight (ignored) or answered (its first answer
    /// is sent again).
    pub fn claim(&self, key: &IntentKey) -> bool {
        self.once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claim(key, &self.results)
    }

    /// Records `input` as `key`'s answer and sends it.
    pub fn finish(&self, key: &IntentKey, input: Input) {
        self.once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .answer(key, &input);
        let _ = self.results.send(input);
    }

    /// Sends a fact the edge found (not an answer to an intent).
    pub fn report(&self, input: Input) {
        let _ = self.results.send(input);
    }
}

/// What every worker of an edge shares: its ledger, its state `S` behind a mutex, and
/// its optional stream of events `E`.
pub struct Core<S, E> {
    answers: Answers,
    state: Arc<Mutex<S>>,
    events: Option<mpsc::UnboundedSender<E>>,
}

impl<S, E> Clone for Core<S, E> {
    fn clone(&self) -> Self {
        Core {
            answers: self.answers.clone(),
            state: self.state.clone(),
            events: self.events.clone(),
        }
    }
}

impl<S: Default, E> Core<S, E> {
    /// A core with a fresh state, answering on `results`.
    pub fn new(results: ResultSender, events: Option<mpsc::UnboundedSender<E>>) -> Self {
        Core {
            answers: Answers::new(results),
            state: Arc::default(),
            events,
        }
    }
}

impl<S, E> Core<S, E> {
    /// The ledger.
    pub fn answers(&self) -> &Answers {
        &self.answers
    }

    /// The edge's state (a poisoned lock is taken over: the state stays usable).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the event stream, if there is one.
    pub fn event(&self, e: E) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// See [`Answers::claim`].
    pub fn claim(&self, key: &IntentKey) -> bool {
        self.answers.claim(key)
    }

    /// See [`Answers::finish`].
    pub fn finish(&self, key: &IntentKey, input: Input) {
        self.answers.finish(key, input)
    }

    /// See [`Answers::report`].
    pub fn report(&self, input: Input) {
        self.answers.report(input)
    }

    /// Answers a host action (a force-down, an unfence) with its outcome.
    pub fn finish_host(&self, host: HostId, key: IntentKey, outcome: RestoreOutcome) {
        let input = Input::HostActionResult {
            host,
            key: key.clone(),
            outcome,
        };
        self.finish(&key, input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records what it is handed.
    #[derive(Clone)]
    struct Recorder {
        answers: Answers,
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        alone: Arc<AtomicUsize>,
        now: Arc<AtomicUsize>,
    }

    impl Work for Recorder {
        type Batched = String;
        type Alone = ();
        type Now = ();
        fn answers(&self) -> &Answers {
            &self.answers
        }
        async fn batch(self, batch: Vec<(IntentKey, String)>) {
            self.batches
                .lock()
                .unwrap()
                .push(batch.into_iter().map(|(_, s)| s).collect());
        }
        async fn alone(self, _: IntentKey, _: ()) {
            self.alone.fetch_add(1, Ordering::SeqCst);
        }
        fn now(&self, _: ()) {
            self.now.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn key(s: &str) -> IntentKey {
        IntentKey(s.into())
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_within_the_window_are_one_batch_and_a_key_is_taken_once() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let w = Recorder {
            answers: Answers::new(tx),
            batches: Arc::default(),
            alone: Arc::default(),
            now: Arc::default(),
        };
        let jobs = start(w.clone(), "stopped");
        jobs.send_unanswered(Job::Batch(key("a"), "a".into()));
        jobs.send_unanswered(Job::Now(()));
        jobs.send_unanswered(Job::Batch(key("b"), "b".into()));
        jobs.send_unanswered(Job::Batch(key("a"), "a again".into()));
        jobs.send_unanswered(Job::Alone(key("c"), ()));
        jobs.send_unanswered(Job::Alone(key("c"), ()));
        tokio::time::sleep(BATCH_WINDOW * 2).await;
        jobs.send_unanswered(Job::Batch(key("d"), "d".into()));
        tokio::time::sleep(BATCH_WINDOW * 2).await;
        assert_eq!(
            *w.batches.lock().unwrap(),
            vec![vec!["a".to_string(), "b".into()], vec!["d".into()]]
        );
        assert_eq!(w.alone.load(Ordering::SeqCst), 1, "c in flight: ignored");
        assert_eq!(w.now.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_job_the_worker_cannot_take_is_answered_as_failed() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel::<JobOf<Recorder>>();
        drop(jobs_rx);
        let jobs: Jobs<Recorder> = Jobs {
            tx: jobs_tx,
            results: tx,
            stopped: "the test worker stopped",
        };
        let host = HostId::new("h1");
        jobs.send_host(&host, &key("k"), Job::Now(()));
        assert_eq!(
            rx.try_recv().ok(),
            Some(Input::HostActionResult {
                host: host.clone(),
                key: key("k"),
                outcome: RestoreOutcome::Failed {
                    reason: "the test worker stopped".into()
                },
            })
        );
    }
}
