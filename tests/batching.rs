//! The batching policy's cases: a lone request never waits, closed-loop callers fill batches,
//! and rows known to be on their way are waited for up to `max_delay_ms`, not beyond.
//!
//! The test kind records every batch's rows; the upstream one is *gated* (each batch waits for
//! a permit), so the "on its way" cases are driven step by step. Long `max_delay_ms` values make
//! a wrong decision visible in the metrics (a wait that should not happen is counted, and one
//! that should is measured) rather than in timings.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use maas_engine::{Engine, EngineOptions};
use maas_graphs::{KindError, PortSpec, Signature, SourceFile, SubmodelSpec, ty};
use maas_kernels::{Kernel, KernelError, Kind, Value, Values};

mod common;
use common::eventually;

/// `x` f32[B,N] -> `out` = x. Records the rows of every batch; with a gate, each batch first
/// waits for a permit.
#[derive(Clone)]
struct Recorder {
    name: &'static str,
    gate: Option<flume::Receiver<()>>,
    batches: Arc<Mutex<Vec<usize>>>,
    /// Batches that entered `forward` (also those still at the gate).
    entered: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(name: &'static str, gate: Option<flume::Receiver<()>>) -> Self {
        Self { name, gate, batches: Arc::default(), entered: Arc::default() }
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

impl Kind for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    fn warm_up(&self) -> bool {
        false
    }

    fn signature(&self, _: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, _: &SubmodelSpec, _: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        Ok(Arc::new(self.clone()))
    }
}

impl Kernel for Recorder {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        self.entered.fetch_add(1, SeqCst);
        if let Some(gate) = &self.gate {
            gate.recv_timeout(Duration::from_secs(20))
                .map_err(|_| KernelError::Panicked("gate never opened".into()))?;
        }
        let x = inputs["x"].as_tensor().expect("checked");
        self.batches.lock().unwrap().push(x.dim(0).expect("rows"));
        Ok(Values::from([("out".to_string(), Value::Tensor(x.clone()))]))
    }
}

fn row(v: f32) -> Values {
    Values::from([("x".to_string(), Value::Tensor(Tensor::new(&[[v, 0.0]], &Device::Cpu).unwrap()))])
}

async fn engine(kinds: Vec<Recorder>, graph: &str) -> Engine {
    let mut b = Engine::builder().options(EngineOptions::default());
    for k in kinds {
        b = b.register(k);
    }
    b.from_sources(vec![SourceFile::new("test.toml", graph, ".")]).await.expect("engine starts")
}

/// `callers` closed-loop callers, each sending `rounds` one-row requests to `p`.
async fn closed_loop(e: &Engine, callers: usize, rounds: usize) {
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let e = e.clone();
            tokio::spawn(async move {
                for i in 0..rounds {
                    e.infer("p", row((c * 1000 + i) as f32)).await.expect("ok");
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("the callers finish").unwrap();
    }
}

const ONE: &str = r#"
[submodels.t]
kind = "recorder"
batch = { max_size = 64, max_delay_ms = 5000 }

[pipelines.p]
inputs = { x = "f32[B,2]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "t", inputs = { x = "$x" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_is_dispatched_without_waiting() {
    let t = Recorder::new("recorder", None);
    let e = engine(vec![t.clone()], ONE).await;
    for i in 0..20 {
        // With `max_delay_ms = 5000`, one wait would hold this request for five seconds.
        let r = tokio::time::timeout(Duration::from_secs(4), e.infer("p", row(i as f32))).await;
        assert!(r.expect("answered without waiting out max_delay").is_ok());
    }
    let m = &e.metrics().submodels["t"];
    assert_eq!((m.batches_at_once, m.batches_waited), (20, 0), "a lone caller never waits");
    assert_eq!(t.batches(), vec![1; 20]);
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_callers_form_batches_of_their_number() {
    const CALLERS: usize = 6;
    const ROUNDS: usize = 40;
    let t = Recorder::new("recorder", None);
    let e = engine(vec![t.clone()], &ONE.replace("5000", "200")).await;
    closed_loop(&e, CALLERS, ROUNDS).await;
    let batches = t.batches();
    assert_eq!(batches.iter().sum::<usize>(), CALLERS * ROUNDS);
    // The first rounds teach the queue the callers' pace; after them the callers, who all
    // wait on this one submodel, travel together. Without waiting for the callers still being
    // answered, batches split into a lone row and the rest, round after round.
    let settled = &batches[batches.len() / 2..];
    let mut sorted = settled.to_vec();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    assert_eq!(median, CALLERS, "batches of the second half: {settled:?}");
    e.shutdown().await;
}

const TWO: &str = r#"
[submodels.g]
kind = "gate"

[submodels.t]
kind = "recorder"
batch = { max_size = 64, max_delay_ms = DELAY }

[pipelines.p]
inputs = { x = "f32[B,2]" }
outputs = { y = "b.out" }

[pipelines.p.nodes]
a = { submodel = "g", inputs = { x = "$x" } }
b = { submodel = "t", inputs = { x = "a.out" } }
"#;

/// Two requests: the first passes the gate and reaches `t`, the second is held at the gate
/// (so it is on its way to `t`). Returns the engine, the permit sender and both requests.
async fn one_through_one_held(
    delay_ms: u64,
) -> (
    Engine,
    Recorder,
    flume::Sender<()>,
    Vec<tokio::task::JoinHandle<Result<maas_engine::Response, maas_engine::InferError>>>,
) {
    let (open, gate) = flume::unbounded();
    let g = Recorder::new("gate", Some(gate));
    let t = Recorder::new("recorder", None);
    let e = engine(vec![g.clone(), t.clone()], &TWO.replace("DELAY", &delay_ms.to_string())).await;
    let first = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(1.0)).await }
    });
    // The first request's batch is at the gate before the second arrives behind it.
    assert!(eventually(Duration::from_secs(5), || g.entered.load(SeqCst) == 1).await);
    let second = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(2.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 1).await);
    open.send(()).unwrap(); // the first request passes the gate
    (e, t, open, vec![first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_on_its_way_is_waited_for_and_joins_the_batch() {
    let (e, t, open, requests) = one_through_one_held(10_000).await;
    // The first row waits at `t` (queued, with its stream free) for the second, which is still
    // upstream: once that passes the gate, both share one batch.
    assert!(
        eventually(Duration::from_secs(5), || e.metrics().submodels["t"].held == 1).await,
        "the first row is held for the second"
    );
    assert!(t.batches().is_empty());
    open.send(()).unwrap();
    for r in requests {
        r.await.unwrap().expect("ok");
    }
    assert_eq!(t.batches(), vec![2], "the row on its way joined the waiting one");
    let m = &e.metrics().submodels["t"];
    assert_eq!((m.batches_at_once, m.batches_waited), (0, 1));
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_on_its_way_is_waited_for_no_longer_than_max_delay() {
    let (e, t, open, mut requests) = one_through_one_held(300).await;
    // The second request stays at the gate: the first waits at `t` for it up to 300 ms, then
    // goes alone.
    let first = requests.remove(0);
    let r = tokio::time::timeout(Duration::from_secs(5), first).await.expect("the first request ends");
    r.unwrap().expect("ok");
    assert_eq!(t.batches(), vec![1]);
    let m = e.metrics().submodels["t"].clone();
    assert_eq!((m.batches_at_once, m.batches_waited), (0, 1));
    assert!(
        (0.2..2.0).contains(&m.wait_seconds.sum),
        "waited {:.3} s for a row on its way with max_delay_ms = 300",
        m.wait_seconds.sum
    );
    open.send(()).unwrap();
    requests.remove(0).await.unwrap().expect("ok");
    assert_eq!(t.batches(), vec![1, 1]);
    e.shutdown().await;
}

const CHAIN: &str = r#"
[submodels.s1]
kind = "first"
batch = { max_size = 64, max_delay_ms = 2000 }

[submodels.s2]
kind = "second"
batch = { max_size = 64, max_delay_ms = 2000 }

[pipelines.p]
inputs = { x = "f32[B,2]" }
outputs = { y = "b.out" }

[pipelines.p.nodes]
a = { submodel = "s1", inputs = { x = "$x" } }
b = { submodel = "s2", inputs = { x = "a.out" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batched_stages_in_a_row_do_not_hold_for_each_other() {
    const CALLERS: usize = 4;
    const ROUNDS: usize = 15;
    let (s1, s2) = (Recorder::new("first", None), Recorder::new("second", None));
    let e = engine(vec![s1.clone(), s2.clone()], CHAIN).await;
    // Each stage could wait for the callers whose requests sit in the other stage's queue,
    // held there: the first rounds split the callers between the stages, and if both stages
    // waited for each other's held rows, those rounds would wait out much of their 2 s (over a
    // second in all) before the callers fall into step.
    closed_loop(&e, CALLERS, ROUNDS).await;
    let m = e.metrics();
    let waited: f64 = ["s1", "s2"].iter().map(|s| m.submodels[*s].wait_seconds.sum).sum();
    assert!(waited < 0.5, "the stages waited {waited:.2} s in all (max_delay_ms = 2000 each)");
    // And they still batch: not waiting at all would pass the check above with lone rows.
    for (name, rec) in [("s1", &s1), ("s2", &s2)] {
        let batches = rec.batches();
        assert_eq!(batches.iter().sum::<usize>(), CALLERS * ROUNDS, "{name}");
        let mean = (CALLERS * ROUNDS) as f64 / batches.len() as f64;
        assert!(mean >= (CALLERS / 2) as f64, "{name} batches: {batches:?}");
    }
    e.shutdown().await;
}
