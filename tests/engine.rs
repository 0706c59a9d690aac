//! The runtime under concurrency and failure: batching across requests, row-by-row retry of a
//! poison row, replica restarts, bounded queues, deadlines, cancellation and graceful shutdown.
//!
//! The test kinds are *gated*: their kernel blocks until the test lets a batch through, so
//! every scenario is driven step by step instead of by timing.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use maas_engine::{Engine, EngineOptions, InferError, InferOptions, RestartPolicy};
use maas_graphs::{KindError, PortSpec, Signature, SourceFile, SubmodelSpec, ty};
use maas_kernels::{Kernel, KernelError, Kind, Value, Values};

mod common;
use common::eventually;

/// What a gated kernel saw.
#[derive(Default)]
struct Log {
    /// Rows of every batch that ran.
    batches: Mutex<Vec<usize>>,
    /// Kernel calls (including ones that panicked).
    calls: AtomicUsize,
}

/// `x` f32[B,N] -> `out` = x + 1. Each batch waits for a permit on `gate` (or runs freely when
/// the gate is `None`); a row whose first value is 13 makes it panic, and one whose first value
/// is negative is refused as invalid input.
#[derive(Clone)]
struct Gated {
    name: &'static str,
    gate: Option<flume::Receiver<()>>,
    log: Arc<Log>,
}

impl Kind for Gated {
    fn name(&self) -> &str {
        self.name
    }

    /// Its forward counts calls and waits on a gate: no synthetic warm-up batch.
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

fn firsts(x: &Tensor) -> Vec<f32> {
    x.narrow(1, 0, 1).and_then(|c| c.flatten_all()).and_then(|c| c.to_vec1()).expect("f32")
}

impl Kernel for Gated {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        self.log.calls.fetch_add(1, SeqCst);
        if let Some(gate) = &self.gate {
            gate.recv_timeout(Duration::from_secs(20))
                .map_err(|_| KernelError::Panicked("gate never opened".into()))?;
        }
        let x = inputs["x"].as_tensor().expect("checked");
        if firsts(x).contains(&13.0) {
            panic!("poison row");
        }
        if let Some((row, v)) = firsts(x).into_iter().enumerate().find(|(_, v)| *v < 0.0) {
            return Err(KernelError::Input {
                port: "x".into(),
                message: format!("{v} at row {row} is negative; values must be at least 0"),
            });
        }
        self.log.batches.lock().unwrap().push(x.dim(0).expect("rows"));
        Ok(Values::from([("out".to_string(), Value::Tensor((x + 1.0).expect("add")))]))
    }
}

fn row(v: f32) -> Values {
    Values::from([("x".to_string(), Value::Tensor(Tensor::new(&[[v, 0.0]], &Device::Cpu).unwrap()))])
}

fn out_first(r: &maas_engine::Response) -> Vec<f32> {
    r.outputs["y"].as_tensor().unwrap().narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

const GRAPH: &str = r#"
[submodels.g]
kind = "gated"
SETTINGS

[submodels.other]
kind = "linear"
params = { in = 2, out = 2, seed = 3 }

[pipelines.p]
inputs = { x = "f32[B,2]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "g", inputs = { x = "$x" } }

[pipelines.q]
inputs = { x = "f32[B,2]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "other", inputs = { x = "$x" } }
"#;

async fn engine(kind: Gated, settings: &str, options: EngineOptions) -> Engine {
    Engine::builder()
        .register(kind)
        .options(options)
        .from_sources(vec![SourceFile::new("test.toml", GRAPH.replace("SETTINGS", settings), ".")])
        .await
        .expect("engine starts")
}

fn gated(gate: Option<flume::Receiver<()>>) -> (Gated, Arc<Log>) {
    let log = Arc::new(Log::default());
    (Gated { name: "gated", gate, log: log.clone() }, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_queued_while_the_stream_is_busy_share_one_batch() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "batch = { max_size = 16, max_delay_ms = 0 }", EngineOptions::default()).await;
    // The first request occupies the stream; the next eight queue behind it.
    let first = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(0.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    let rest: Vec<_> = (1..=8)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move { e.infer("p", row(i as f32)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 8).await);
    for _ in 0..2 {
        open.send(()).unwrap();
    }
    assert_eq!(out_first(&first.await.unwrap().unwrap()), [1.0]);
    for (i, r) in rest.into_iter().enumerate() {
        let r = r.await.unwrap().expect("ok");
        assert_eq!(out_first(&r), [i as f32 + 2.0], "each request gets its own row back");
        assert_eq!(r.versions["g"], "v1");
    }
    assert_eq!(*log.batches.lock().unwrap(), vec![1, 8]);
    let m = e.metrics();
    assert_eq!(m.submodels["g"].batch_rows.count, 2);
    assert_eq!(m.pipelines["p"].ok, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_fails_only_its_request_and_the_replica_restarts() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let fast = RestartPolicy { backoff: Duration::from_millis(1), ..RestartPolicy::default() };
    let e =
        engine(kind, "batch = { max_size = 16 }", EngineOptions { restart: fast, ..EngineOptions::default() }).await;
    let blocker = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(100.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    // Queue 5 requests, the middle one poisoned: they form one batch, which panics.
    let reqs: Vec<_> = [1.0, 2.0, 13.0, 4.0, 5.0]
        .into_iter()
        .map(|v| {
            let e = e.clone();
            tokio::spawn(async move { (v, e.infer("p", row(v)).await) })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 5).await);
    // Another pipeline on another submodel keeps serving while `g` fails and restarts.
    let bystander = tokio::spawn({
        let e = e.clone();
        async move {
            let mut ok = 0;
            for i in 0..200 {
                e.infer("q", row(i as f32)).await.expect("the other pipeline keeps serving");
                ok += 1;
                tokio::task::yield_now().await;
            }
            ok
        }
    });
    for _ in 0..20 {
        open.send(()).unwrap();
    }
    assert!(blocker.await.unwrap().is_ok());
    for r in reqs {
        let (v, result) = r.await.unwrap();
        if v == 13.0 {
            match result {
                Err(InferError::SubmodelFailed { submodel, message, .. }) => {
                    assert_eq!(submodel, "g");
                    assert!(message.contains("poison row"), "{message}");
                }
                other => panic!("poison row: {other:?}"),
            }
        } else {
            assert_eq!(out_first(&result.expect("innocent rows succeed")), [v + 1.0]);
        }
    }
    // The batch panicked (the poison row's first attempt); every row was then run alone and
    // the poison row panicked again on its one retry: 2 restarts, 1 failed job. (The failed job
    // is answered before its replica's failure reaches the supervisor: wait for the count.)
    assert!(
        eventually(Duration::from_secs(5), || e.metrics().submodels["g"].restarts >= 2).await,
        "{:?}",
        e.metrics().submodels["g"]
    );
    let m = e.metrics();
    assert_eq!(m.submodels["g"].restarts, 2, "{:?}", m.submodels["g"]);
    assert_eq!(m.submodels["g"].jobs_failed, 1);
    assert_eq!(*log.batches.lock().unwrap(), vec![1, 1, 1, 1, 1], "the blocker, then the four innocent rows alone");
    assert_eq!(bystander.await.unwrap(), 200);
    assert!(eventually(Duration::from_secs(5), || e.ready()).await, "{:?}", e.submodels());
    assert!(e.infer("p", row(7.0)).await.is_ok(), "serves again after the restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_is_invalid_input_and_fails_neither_its_batch_nor_its_submodel() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "batch = { max_size = 16 }", EngineOptions::default()).await;
    let blocker = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(100.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    // Three requests queue behind the blocker and form one batch, which the kernel refuses as
    // invalid input because of the middle row; the rows are then run one by one.
    let reqs: Vec<_> = [1.0, -1.0, 3.0]
        .into_iter()
        .map(|v| {
            let e = e.clone();
            tokio::spawn(async move { (v, e.infer("p", row(v)).await) })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 3).await);
    for _ in 0..10 {
        open.send(()).unwrap();
    }
    assert!(blocker.await.unwrap().is_ok());
    for r in reqs {
        let (v, result) = r.await.unwrap();
        if v < 0.0 {
            match result {
                Err(InferError::InvalidInput(m)) => {
                    assert!(m.contains("node `n` (submodel `g`)") && m.contains("input port `x`"), "{m}");
                    assert!(m.contains("-1 at row 0 is negative"), "{m}");
                }
                other => panic!("refused row: {other:?}"),
            }
        } else {
            assert_eq!(out_first(&result.expect("the other rows succeed")), [v + 1.0]);
        }
    }
    let m = e.metrics();
    assert_eq!((m.submodels["g"].jobs_failed, m.submodels["g"].restarts), (0, 0), "{:?}", m.submodels["g"]);
    assert_eq!(*log.batches.lock().unwrap(), vec![1, 1, 1], "the blocker, then the two valid rows alone");
    assert_eq!(e.submodels()[0].state, "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_tensor_is_described_as_empty() {
    let (kind, _) = gated(None);
    let e = engine(kind, "", EngineOptions::default()).await;
    for dims in [[1, 0], [0, 2]] {
        let empty = Values::from([(
            "x".to_string(),
            Value::Tensor(Tensor::zeros(&dims, candle_core::DType::F32, &Device::Cpu).unwrap()),
        )]);
        match e.infer("p", empty).await {
            Err(InferError::InvalidInput(m)) => {
                let want = format!("input port `x` is empty (shape {dims:?}); expected f32[B,2]");
                assert!(m.contains(&want), "`{want}` not in: {m}");
            }
            other => panic!("{dims:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_accepted_requests_complete() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "queue = 2\nbatch = { max_size = 1 }", EngineOptions::default()).await;
    let running = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(0.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let e = e.clone();
            tokio::spawn(async move { e.infer("p", row(1.0)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 2).await);
    // The queue is full and the stream is still blocked: refused without waiting for it.
    for _ in 0..5 {
        match e.infer("p", row(2.0)).await {
            Err(InferError::Overloaded(msg)) => assert!(msg.contains("submodel `g`"), "{msg}"),
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }
    assert_eq!(e.metrics().submodels["g"].jobs_rejected, 5);
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    assert!(running.await.unwrap().is_ok());
    for q in queued {
        assert!(q.await.unwrap().is_ok());
    }
    assert_eq!(e.metrics().pipelines["p"].errors["overloaded"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_admission_is_bounded() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "", EngineOptions { max_in_flight: 1, ..EngineOptions::default() }).await;
    let running = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(0.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    assert!(matches!(e.infer("p", row(1.0)).await, Err(InferError::Overloaded(_))));
    open.send(()).unwrap();
    assert!(running.await.unwrap().is_ok());
    open.send(()).unwrap();
    assert!(e.infer("p", row(1.0)).await.is_ok(), "a permit is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_requests_and_expired_rows_are_not_computed() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "", EngineOptions::default()).await;
    let short = InferOptions { deadline: Some(Duration::from_millis(30)) };
    // The stream is blocked: the first request's deadline passes while it computes, the
    // second's while it waits in the queue.
    let first = tokio::spawn({
        let (e, short) = (e.clone(), short.clone());
        async move { e.infer_with("p", row(0.0), short).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    let second = e.infer_with("p", row(1.0), short.clone()).await;
    assert!(matches!(second, Err(InferError::DeadlineExceeded(_))), "{second:?}");
    assert!(matches!(first.await.unwrap(), Err(InferError::DeadlineExceeded(_))));
    open.send(()).unwrap();
    open.send(()).unwrap();
    // The queued row expired before it reached the stream: it is dropped, never computed.
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].jobs_dropped == 1).await);
    assert!(e.infer("p", row(2.0)).await.is_ok());
    assert_eq!(log.calls.load(SeqCst), 2, "the expired row never ran");
    assert_eq!(e.metrics().pipelines["p"].errors["deadline_exceeded"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_is_not_computed() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "", EngineOptions::default()).await;
    let first = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(0.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || log.calls.load(SeqCst) == 1).await);
    let abandoned = tokio::spawn({
        let e = e.clone();
        async move { e.infer("p", row(1.0)).await }
    });
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].queued == 1).await);
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    assert_eq!(e.metrics().in_flight, 1, "the abandoned request released its admission permit");
    open.send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    assert!(eventually(Duration::from_secs(5), || e.metrics().submodels["g"].jobs_dropped == 1).await);
    open.send(()).unwrap();
    assert!(e.infer("p", row(2.0)).await.is_ok());
    assert_eq!(log.calls.load(SeqCst), 2, "the abandoned row never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let (open, gate) = flume::unbounded();
    let (kind, log) = gated(Some(gate));
    let e = engine(kind, "batch = { max_size = 1 }", EngineOptions::default()).await;
    let reqs: Vec<_> = (0..4)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move { e.infer("p", row(i as f32)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || e.metrics().in_flight == 4).await);
    let stopping = tokio::spawn({
        let e = e.clone();
        async move { e.shutdown().await }
    });
    assert!(eventually(Duration::from_secs(5), || !e.ready()).await);
    assert!(matches!(e.infer("p", row(9.0)).await, Err(InferError::ShuttingDown)));
    for _ in 0..4 {
        open.send(()).unwrap();
    }
    for r in reqs {
        assert!(r.await.unwrap().is_ok(), "in-flight requests finish during shutdown");
    }
    assert_eq!(stopping.await.unwrap(), 0, "nothing left running at shutdown");
    assert_eq!(log.calls.load(SeqCst), 4);
    assert!(e.submodels().iter().all(|s| s.state == "stopped"), "{:?}", e.submodels());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_max_size_are_split_not_truncated() {
    let (kind, log) = gated(None);
    let e = engine(kind, "batch = { max_size = 4 }", EngineOptions::default()).await;
    let rows: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let x = Tensor::from_vec(rows.iter().flat_map(|v| [*v, 0.0]).collect::<Vec<_>>(), (10, 2), &Device::Cpu).unwrap();
    let r = e.infer("p", Values::from([("x".to_string(), Value::Tensor(x))])).await.unwrap();
    assert_eq!(out_first(&r), rows.iter().map(|v| v + 1.0).collect::<Vec<_>>());
    let batches = log.batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| *b <= 4), "{batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_the_engine_keeps_serving() {
    let (kind, _) = gated(None);
    let e = engine(kind, "", EngineOptions::default()).await;
    assert!(matches!(e.infer("nope", row(1.0)).await, Err(InferError::UnknownPipeline(p)) if p == "nope"));
    let wrong =
        Values::from([("x".to_string(), Value::Tensor(Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap()))]);
    match e.infer("p", wrong).await {
        Err(InferError::InvalidInput(m)) => assert!(m.contains("input port `x`") && m.contains("f32[B,2]"), "{m}"),
        other => panic!("{other:?}"),
    }
    let text = Values::from([("x".to_string(), Value::text(["hi"]))]);
    assert!(matches!(e.infer("p", text).await, Err(InferError::InvalidInput(_))));
    assert!(
        matches!(e.infer("p", Values::new()).await, Err(InferError::InvalidInput(m)) if m.contains("`x` is missing"))
    );
    assert!(e.infer("p", row(1.0)).await.is_ok());
    let listed = e.pipelines();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].name, "p");
    assert_eq!(listed[0].inputs[0].1.to_string(), "f32[B,2]");
    let subs = e.submodels();
    assert_eq!((subs[0].name.as_str(), subs[0].state.as_str(), subs[0].inline), ("g", "ready", false));
    assert_eq!(subs.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_submodel_comes_back_after_its_restart_window() {
    let (kind, _) = gated(None);
    let policy = RestartPolicy {
        max_restarts: 2,
        window: Duration::from_millis(300),
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let e = engine(kind, "", EngineOptions { restart: policy, ..EngineOptions::default() }).await;
    // Poison requests until the budget is spent and the submodel is failed.
    for _ in 0..3 {
        let _ = e.infer("p", row(13.0)).await;
        if e.submodels().iter().any(|s| s.name == "g" && s.state == "failed") {
            break;
        }
        assert!(
            eventually(Duration::from_secs(5), || e.submodels()[0].ready_replicas == 1
                || e.submodels()[0].state == "failed")
            .await
        );
    }
    assert!(eventually(Duration::from_secs(5), || e.submodels()[0].state == "failed").await, "{:?}", e.submodels());
    assert!(!e.ready());
    match e.infer("p", row(1.0)).await {
        Err(InferError::SubmodelFailed { message, .. }) => assert!(message.contains("not serving"), "{message}"),
        other => panic!("a failed submodel answers at once: {other:?}"),
    }
    // After the window, the replica is started again and serves.
    assert!(eventually(Duration::from_secs(10), || e.ready()).await, "{:?}", e.submodels());
    assert_eq!(out_first(&e.infer("p", row(1.0)).await.expect("serves again")), [2.0]);
}

/// A restarted replica's stream takes the poison job waiting for it and dies within
/// microseconds of loading, often before its supervisor has heard that it started: that end must
/// still be seen (restart, or the job answered), never leave the job queued with no stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_as_soon_as_it_restarts_is_still_restarted() {
    let (kind, _) = gated(None);
    let policy = RestartPolicy {
        max_restarts: 1000,
        window: Duration::from_secs(60),
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let e = engine(kind, "", EngineOptions { restart: policy, ..EngineOptions::default() }).await;
    // Each poison job panics on a stream, is requeued, and panics again on the restarted
    // stream the moment it starts.
    for i in 0..25 {
        let r = tokio::time::timeout(Duration::from_secs(20), e.infer("p", row(13.0)))
            .await
            .unwrap_or_else(|_| panic!("poison request {i} never ended: {:?}", e.submodels()));
        assert!(matches!(r, Err(InferError::SubmodelFailed { .. })), "{r:?}");
    }
    let r = tokio::time::timeout(Duration::from_secs(20), e.infer("p", row(1.0))).await.expect("ends");
    assert_eq!(out_first(&r.expect("serves after the restarts")), [2.0]);
    assert_eq!(e.metrics().submodels["g"].restarts, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_needing_more_batches_than_the_queue_holds_is_invalid() {
    let (kind, log) = gated(None);
    let e = engine(kind, "queue = 2\nbatch = { max_size = 1 }", EngineOptions::default()).await;
    let x = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    match e.infer("p", Values::from([("x".to_string(), Value::Tensor(x))])).await {
        Err(InferError::InvalidInput(m)) => assert!(m.contains("3 rows need 3 batches"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.calls.load(SeqCst), 0);
    assert_eq!(e.metrics().submodels["g"].queued, 0, "no slot stays reserved");
    let x = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(e.infer("p", Values::from([("x".to_string(), Value::Tensor(x))])).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_deadline_is_no_deadline() {
    let (kind, _) = gated(None);
    let e = engine(kind, "", EngineOptions::default()).await;
    let r = e.infer_with("p", row(1.0), InferOptions { deadline: Some(Duration::MAX) }).await;
    assert_eq!(out_first(&r.expect("ok")), [2.0]);
}
