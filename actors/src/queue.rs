//! A submodel's queue: the data path between requests and execution streams.
//!
//! Requests push jobs straight into it (no actor message on the way), and the submodel's
//! stream threads take batches out of it: a stream that finds work takes it at once, spins
//! briefly before parking when there is none, and decides itself whether a batch should wait
//! for more rows. The submodel actor stays beside the data path: it supervises the streams,
//! refuses work when every replica failed, and closes the queue when the submodel stops.
//!
//! # When a batch waits
//!
//! A stream with a queue that holds fewer than `max_size` rows waits for more only when more
//! are *expected soon*, and never past `max_delay` after the oldest queued row could have
//! started (its arrival, or when the stream became free if it arrived while the stream was
//! busy):
//!
//! 1. **Rows on their way** ([`Demand::upstream`]): an admitted request will send this
//!    submodel a job as soon as the submodels before it finish (its tokenizer is running,
//!    say). The stream waits for it.
//! 2. **Other callers about**: some admitted request that uses this submodel has no job here
//!    ([`Demand::users`] exceeds the jobs queued and running: its caller is likely to send
//!    another), *and* the recent average gap between arrivals is shorter than the time left.
//!
//! Otherwise the batch goes at once: a lone caller, or callers that all already wait here,
//! can send nothing more, so waiting would only add latency.
//!
//! Jobs that another queue of the engine is holding back (its stream waits for a fuller
//! batch) do not count as coming in either rule: they move only when that queue dispatches, and
//! two queues waiting for each other's jobs would each wait out `max_delay`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::metrics::SubmodelMetrics;
use crate::protocol::{Job, JobError};

/// How often a holding stream re-reads the engine's held jobs (a hold that starts in another
/// queue can make this one's wait pointless).
const RECHECK: Duration = Duration::from_micros(500);

/// What the engine knows about the work coming to a submodel (one version of it).
#[derive(Debug, Default)]
pub struct Demand {
    upstream: AtomicUsize,
    users: AtomicUsize,
    /// What the process that sends this submodel its jobs from afar said with its latest job
    /// (a submodel on a node: see [`Demand::hint`]).
    hinted_upstream: AtomicUsize,
    hinted_users: AtomicUsize,
}

impl Demand {
    /// A request will send a job here once the nodes before it are done.
    pub fn expect(&self) {
        self.upstream.fetch_add(1, Release);
    }

    /// An expected job is about to be pushed (or will never come). Called *before* the push,
    /// so a stream never waits for a job that is already queued.
    pub fn arrived(&self) {
        self.upstream.fetch_sub(1, Release);
    }

    /// An admitted request whose pipeline uses this submodel started.
    pub fn enter(&self) {
        self.users.fetch_add(1, Release);
    }

    /// That request ended.
    pub fn leave(&self) {
        self.users.fetch_sub(1, Release);
    }

    /// The demand another process counts for this submodel, as it was when it sent its latest
    /// job (a submodel hosted on a node for a serving process, whose requests are counted
    /// there). Replaced by each job; a stale value can only hold a batch up to `max_delay`.
    pub fn hint(&self, upstream: usize, users: usize) {
        self.hinted_upstream.store(upstream, Release);
        self.hinted_users.store(users, Release);
    }

    /// Jobs on their way now.
    pub fn upstream(&self) -> usize {
        self.upstream.load(Acquire) + self.hinted_upstream.load(Acquire)
    }

    /// Admitted requests that use this submodel now.
    pub fn users(&self) -> usize {
        self.users.load(Acquire) + self.hinted_users.load(Acquire)
    }
}

/// How a submodel forms batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Rows per batch at most (`usize::MAX` without a `batch` section).
    pub max_size: usize,
    /// The longest a row waits for others to join its batch (zero: never waits).
    pub max_delay: Duration,
    /// How long an idle stream polls for work before it parks (a parked stream costs a thread
    /// wake-up to restart).
    pub spin: Duration,
}

/// How a queued job ends when the queue cannot serve it.
#[derive(Debug, Clone)]
enum Refusal {
    /// Every replica failed (cleared when one serves again).
    Failed(String),
    /// The submodel stopped (final).
    Closed(String),
}

#[derive(Debug)]
struct State {
    jobs: VecDeque<Job>,
    /// Rows queued.
    rows: usize,
    /// Jobs queued or in a running batch.
    here: usize,
    /// Streams waiting on the condition variable.
    parked: usize,
    refusal: Option<Refusal>,
    last_arrival: Option<Instant>,
    /// Moving average of the time between arrivals (seconds, each gap capped at `max_delay`).
    gap: f64,
    /// Streams holding a batch back now.
    holding: usize,
    /// What this queue adds to the engine's count of held jobs (its queued jobs while a stream
    /// holds, else 0).
    held: usize,
}

/// A submodel's queue (see the module documentation).
#[derive(Debug)]
pub struct SubmodelQueue {
    state: Mutex<State>,
    work: Condvar,
    /// Jobs queued (read without the lock by spinning streams).
    len: AtomicUsize,
    demand: Demand,
    policy: BatchPolicy,
    metrics: Arc<SubmodelMetrics>,
    /// Batches taken (a cheap progress counter for tests and drains).
    taken: AtomicU64,
    /// Jobs held back in every queue of the engine (shared by its queues): rows that wait in a
    /// queue whose stream holds them will not move until it dispatches, so no other queue
    /// waits for them.
    held_everywhere: Arc<AtomicUsize>,
}

impl SubmodelQueue {
    /// An empty, serving queue. `held` is shared by every queue of one engine (jobs held back
    /// for fuller batches; see the module documentation): give each engine its own.
    pub fn new(policy: BatchPolicy, metrics: Arc<SubmodelMetrics>, held: Arc<AtomicUsize>) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                rows: 0,
                here: 0,
                parked: 0,
                refusal: None,
                last_arrival: None,
                gap: policy.max_delay.as_secs_f64(),
                holding: 0,
                held: 0,
            }),
            work: Condvar::new(),
            len: AtomicUsize::new(0),
            demand: Demand::default(),
            policy,
            metrics,
            taken: AtomicU64::new(0),
            held_everywhere: held,
        }
    }

    /// What the engine tells the queue about work on its way.
    pub fn demand(&self) -> &Demand {
        &self.demand
    }

    /// The batching policy.
    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (every update is
        // a few plain assignments), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings this queue's share of the engine's held jobs up to date (after any change of its
    /// jobs or of its holding streams).
    fn sync_held(&self, st: &mut State) {
        let now = if st.holding > 0 { st.jobs.len() } else { 0 };
        if now > st.held {
            self.held_everywhere.fetch_add(now - st.held, Release);
        } else if now < st.held {
            self.held_everywhere.fetch_sub(st.held - now, Release);
        }
        st.held = now;
        self.metrics.held.store(now as u64, Relaxed);
    }

    /// Queues a job (the engine has already counted it in the `queued` gauge). A queue that
    /// cannot serve answers the job at once.
    pub fn push(&self, job: Job) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(refusal) = &st.refusal {
            let error = match refusal {
                Refusal::Failed(e) | Refusal::Closed(e) => JobError::Unavailable(e.clone()),
            };
            drop(st);
            self.metrics.queued.fetch_sub(1, Relaxed);
            self.metrics.jobs_failed.fetch_add(1, Relaxed);
            job.answer(Err(error));
            return;
        }
        if let Some(last) = st.last_arrival {
            let gap = now.saturating_duration_since(last).min(self.policy.max_delay).as_secs_f64();
            st.gap += (gap - st.gap) / 8.0;
        }
        st.last_arrival = Some(now);
        st.rows = st.rows.saturating_add(job.rows);
        st.here += 1;
        st.jobs.push_back(job);
        self.len.store(st.jobs.len(), Release);
        self.sync_held(&mut st);
        let wake = st.parked > 0;
        drop(st);
        if wake {
            self.work.notify_one();
        }
    }

    /// Takes the next batch, waiting for work (and, per the policy, for a fuller batch).
    /// `None` once the queue is closed.
    pub(crate) fn take(&self) -> Option<Vec<Job>> {
        let mut waited_since: Option<Instant> = None;
        let mut spun = false;
        let free_since = Instant::now();
        let mut st = self.lock();
        loop {
            if matches!(st.refusal, Some(Refusal::Closed(_))) {
                return None;
            }
            let now = Instant::now();
            self.prune(&mut st, now);
            self.sync_held(&mut st);
            if st.jobs.is_empty() {
                if !spun && !self.policy.spin.is_zero() {
                    // Poll briefly: under a steady trickle the next job comes within
                    // microseconds, and taking it without parking saves two thread wake-ups.
                    drop(st);
                    spun = true;
                    let until = now + self.policy.spin;
                    let mut polls = 0u32;
                    while self.len.load(Acquire) == 0 && Instant::now() < until {
                        polls = polls.wrapping_add(1);
                        if polls.is_multiple_of(64) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    st = self.lock();
                    continue;
                }
                st.parked += 1;
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                st.parked -= 1;
                spun = false;
                continue;
            }
            if let Some(until) = self.hold_until(&st, now, free_since) {
                waited_since.get_or_insert(now);
                st.parked += 1;
                st.holding += 1;
                self.sync_held(&mut st);
                // Look again at least every `RECHECK`: other queues starting or ending holds
                // change what counts as coming, and they do not wake this stream.
                let nap = (until - now).min(RECHECK);
                st = self.work.wait_timeout(st, nap).unwrap_or_else(|p| p.into_inner()).0;
                st.parked -= 1;
                st.holding -= 1;
                self.sync_held(&mut st);
                continue;
            }
            let batch = self.pop_batch(&mut st);
            self.sync_held(&mut st);
            let more = !st.jobs.is_empty() && st.parked > 0;
            drop(st);
            if more {
                // Work is left for another idle stream.
                self.work.notify_one();
            }
            match waited_since {
                Some(since) => {
                    self.metrics.batches_waited.fetch_add(1, Relaxed);
                    self.metrics.wait_seconds.observe(now.saturating_duration_since(since).as_secs_f64());
                }
                None => {
                    self.metrics.batches_at_once.fetch_add(1, Relaxed);
                }
            }
            self.taken.fetch_add(1, Relaxed);
            return Some(batch);
        }
    }

    /// Until when the batch at the front should wait for more rows, or `None` to go now. The
    /// wait is bounded by `max_delay` after the oldest row could have started: its arrival, or
    /// `free_since` (when this stream became free) if it arrived while the stream was busy.
    fn hold_until(&self, st: &State, now: Instant, free_since: Instant) -> Option<Instant> {
        let p = &self.policy;
        let front = st.jobs.front()?;
        if p.max_delay.is_zero() || st.rows >= p.max_size || front.alone {
            return None;
        }
        let start = front.enqueued.max(free_since);
        let limit = start.checked_add(p.max_delay)?;
        if now >= limit {
            return None;
        }
        // Jobs that other queues hold back will not move until those dispatch: waiting for
        // them here could make two queues wait for each other.
        let held_elsewhere = self.held_everywhere.load(Acquire).saturating_sub(st.held);
        if self.demand.upstream() > held_elsewhere {
            return Some(limit);
        }
        if self.demand.users() <= st.here.saturating_add(held_elsewhere) {
            return None;
        }
        // Another row is likely within the wait when arrivals have recently come closer
        // together than the time left (each gap in the average is capped at `max_delay`, so a
        // quiet spell soon stops the waits).
        let gap = Duration::from_secs_f64(st.gap.max(0.0));
        let left = limit - now;
        if gap >= left {
            return None;
        }
        Some(limit - gap)
    }

    /// Answers or drops what nobody waits for any more at the front of the queue.
    fn prune(&self, st: &mut State, now: Instant) {
        while let Some(front) = st.jobs.front() {
            if !(front.cancelled() || front.expired(now)) {
                break;
            }
            let job = self.remove_front(st);
            st.here -= 1;
            self.metrics.jobs_dropped.fetch_add(1, Relaxed);
            if !job.cancelled() {
                job.answer(Err(JobError::DeadlineExceeded));
            }
        }
    }

    fn remove_front(&self, st: &mut State) -> Job {
        let job = st.jobs.pop_front().expect("the queue has a front");
        st.rows = st.rows.saturating_sub(job.rows);
        self.len.store(st.jobs.len(), Release);
        self.metrics.queued.fetch_sub(1, Relaxed);
        job
    }

    /// Takes jobs from the front while they fit `max_size` rows and give the same ports.
    fn pop_batch(&self, st: &mut State) -> Vec<Job> {
        let first = self.remove_front(st);
        if first.alone {
            return vec![first];
        }
        let mut rows = first.rows;
        let mut batch = Vec::with_capacity(st.jobs.len().min(64) + 1);
        batch.push(first);
        while let Some(next) = st.jobs.front() {
            let same_ports = next.inputs.len() == batch[0].inputs.len()
                && next.inputs.keys().zip(batch[0].inputs.keys()).all(|(a, b)| a == b);
            if next.alone || rows.saturating_add(next.rows) > self.policy.max_size || !same_ports {
                break;
            }
            rows = rows.saturating_add(next.rows);
            let job = self.remove_front(st);
            batch.push(job);
        }
        batch
    }

    /// `n` jobs of a batch were answered.
    pub(crate) fn finished(&self, n: usize) {
        if n > 0 {
            let mut st = self.lock();
            st.here = st.here.saturating_sub(n);
        }
    }

    /// Puts jobs of a failed batch back at the front, to run alone (they still count as here).
    pub(crate) fn requeue(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut st = self.lock();
        self.metrics.queued.fetch_add(jobs.len() as u64, Relaxed);
        for mut job in jobs.into_iter().rev() {
            job.alone = true;
            st.rows = st.rows.saturating_add(job.rows);
            st.jobs.push_front(job);
        }
        self.len.store(st.jobs.len(), Release);
        self.sync_held(&mut st);
        let wake = st.parked > 0;
        drop(st);
        if wake {
            self.work.notify_one();
        }
    }

    fn drain_all(&self, st: &mut State) -> Vec<Job> {
        let mut out = Vec::with_capacity(st.jobs.len());
        while !st.jobs.is_empty() {
            out.push(self.remove_front(st));
            st.here -= 1;
        }
        self.sync_held(st);
        out
    }

    fn answer_all(&self, jobs: Vec<Job>, error: &str) {
        for job in jobs {
            if job.cancelled() {
                self.metrics.jobs_dropped.fetch_add(1, Relaxed);
            } else {
                self.metrics.jobs_failed.fetch_add(1, Relaxed);
                job.answer(Err(JobError::Unavailable(error.to_string())));
            }
        }
    }

    /// Every replica failed: answers what is queued and every new job with `error`, until
    /// [`serve_again`](Self::serve_again).
    pub(crate) fn fail(&self, error: String) {
        let mut st = self.lock();
        if matches!(st.refusal, Some(Refusal::Closed(_))) {
            return;
        }
        let jobs = self.drain_all(&mut st);
        st.refusal = Some(Refusal::Failed(error.clone()));
        drop(st);
        self.answer_all(jobs, &error);
    }

    /// A replica serves again after the submodel had failed.
    pub(crate) fn serve_again(&self) {
        let mut st = self.lock();
        if matches!(st.refusal, Some(Refusal::Failed(_))) {
            st.refusal = None;
        }
    }

    /// The submodel stops: queued jobs are answered `Unavailable` (or dropped when nobody waits),
    /// new ones are refused, and every stream ends after its current batch.
    pub fn close(&self, error: String) {
        let mut st = self.lock();
        let jobs = self.drain_all(&mut st);
        st.refusal = Some(Refusal::Closed(error.clone()));
        drop(st);
        self.work.notify_all();
        self.answer_all(jobs, &error);
    }

    /// Batches taken so far.
    pub fn batches_taken(&self) -> u64 {
        self.taken.load(Relaxed)
    }
}

impl Drop for SubmodelQueue {
    fn drop(&mut self) {
        let held = self.state.get_mut().map_or(0, |st| st.held);
        if held > 0 {
            self.held_everywhere.fetch_sub(held, Release);
        }
    }
}
