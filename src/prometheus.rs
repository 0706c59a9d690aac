//! The engine's metrics in the Prometheus text exposition format (version 0.0.4), every
//! metric name prefixed `maas_`.

use std::fmt::Write;

use maas_engine::{Engine, HistogramSnapshot};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cumulative = 0;
    for (bound, count) in h.bounds.iter().zip(&h.counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Renders every metric of `engine`.
pub fn render(engine: &Engine) -> String {
    let m = engine.metrics();
    let mut out = String::new();
    header(&mut out, "maas_in_flight_requests", "gauge", "Requests being served now.");
    let _ = writeln!(out, "maas_in_flight_requests {}", m.in_flight);
    header(&mut out, "maas_ready", "gauge", "1 when every submodel serves.");
    let _ = writeln!(out, "maas_ready {}", u8::from(engine.ready()));

    header(&mut out, "maas_requests_total", "counter", "Requests by pipeline and outcome (ok or the error kind).");
    for (p, s) in &m.pipelines {
        let p = escape(p);
        let _ = writeln!(out, "maas_requests_total{{pipeline=\"{p}\",outcome=\"ok\"}} {}", s.ok);
        for (kind, n) in &s.errors {
            let _ = writeln!(out, "maas_requests_total{{pipeline=\"{p}\",outcome=\"{kind}\"}} {n}");
        }
    }
    header(&mut out, "maas_request_duration_seconds", "histogram", "Request latency by pipeline.");
    for (p, s) in &m.pipelines {
        histogram(
            &mut out,
            "maas_request_duration_seconds",
            &format!("pipeline=\"{}\"", escape(p)),
            &s.latency_seconds,
        );
    }

    let states = engine.submodels();
    header(&mut out, "maas_submodel_ready_replicas", "gauge", "Replicas serving now.");
    for s in &states {
        let _ = writeln!(out, "maas_submodel_ready_replicas{{submodel=\"{}\"}} {}", escape(&s.name), s.ready_replicas);
    }
    header(&mut out, "maas_submodel_up", "gauge", "1 when the submodel serves (ready or degraded).");
    for s in &states {
        let up = u8::from(s.state == "ready" || s.state == "degraded");
        let _ = writeln!(out, "maas_submodel_up{{submodel=\"{}\",state=\"{}\"}} {up}", escape(&s.name), s.state);
    }
    header(&mut out, "maas_submodel_node_up", "gauge", "1 when the node hosting a replica of the submodel is up.");
    for s in &states {
        for n in &s.nodes {
            let up = u8::from(n.state == "up");
            let _ = writeln!(
                out,
                "maas_submodel_node_up{{submodel=\"{}\",node=\"{}\",addr=\"{}\"}} {up}",
                escape(&s.name),
                escape(&n.name),
                escape(&n.addr)
            );
        }
    }
    header(&mut out, "maas_node_up", "gauge", "1 when the node is up (connected, authenticated, its agent found).");
    for n in engine.nodes() {
        let up = u8::from(n.state == "up");
        let _ = writeln!(
            out,
            "maas_node_up{{node=\"{}\",addr=\"{}\",state=\"{}\"}} {up}",
            escape(&n.name),
            escape(&n.addr),
            n.state
        );
    }
    // Measured on the nodes, where the batching happens (the serving side's figures for a
    // remote submodel count its jobs and chunks, not its batches).
    let nodes = engine.node_metrics();
    let label = |m: &maas_engine::cluster::NodeInstanceMetrics| {
        format!(
            "node=\"{}\",submodel=\"{}\",version=\"{}\"",
            escape(&m.node),
            escape(&m.stats.submodel),
            escape(&m.stats.version)
        )
    };
    header(
        &mut out,
        "maas_node_jobs_total",
        "counter",
        "Jobs a node ran for this process, by submodel version and outcome.",
    );
    for m in &nodes {
        let l = label(m);
        let _ = writeln!(out, "maas_node_jobs_total{{{l},outcome=\"ok\"}} {}", m.stats.jobs_ok);
        let _ = writeln!(out, "maas_node_jobs_total{{{l},outcome=\"failed\"}} {}", m.stats.jobs_failed);
    }
    header(&mut out, "maas_node_queued_jobs", "gauge", "Jobs waiting in a node's queue for the submodel.");
    for m in &nodes {
        let _ = writeln!(out, "maas_node_queued_jobs{{{}}} {}", label(m), m.stats.queued);
    }
    header(&mut out, "maas_node_batch_rows", "histogram", "Rows per batch a node ran.");
    for m in &nodes {
        if let Some(h) = m.stats.batch_rows_histogram() {
            histogram(&mut out, "maas_node_batch_rows", &label(m), &h);
        }
    }
    header(&mut out, "maas_node_batch_duration_seconds", "histogram", "Compute time per batch on a node.");
    for m in &nodes {
        if let Some(h) = m.stats.compute_seconds_histogram() {
            histogram(&mut out, "maas_node_batch_duration_seconds", &label(m), &h);
        }
    }
    header(&mut out, "maas_submodel_queued_jobs", "gauge", "Jobs waiting in the submodel's queue.");
    for (n, s) in &m.submodels {
        let _ = writeln!(out, "maas_submodel_queued_jobs{{submodel=\"{}\"}} {}", escape(n), s.queued);
    }
    header(&mut out, "maas_submodel_held_jobs", "gauge", "Queued jobs held back now for a fuller batch.");
    for (n, s) in &m.submodels {
        let _ = writeln!(out, "maas_submodel_held_jobs{{submodel=\"{}\"}} {}", escape(n), s.held);
    }
    header(&mut out, "maas_submodel_restarts_total", "counter", "Replica restarts.");
    for (n, s) in &m.submodels {
        let _ = writeln!(out, "maas_submodel_restarts_total{{submodel=\"{}\"}} {}", escape(n), s.restarts);
    }
    header(
        &mut out,
        "maas_submodel_jobs_total",
        "counter",
        "Jobs by outcome: ok, failed, rejected (queue full), dropped.",
    );
    for (n, s) in &m.submodels {
        let n = escape(n);
        for (outcome, v) in
            [("ok", s.jobs_ok), ("failed", s.jobs_failed), ("rejected", s.jobs_rejected), ("dropped", s.jobs_dropped)]
        {
            let _ = writeln!(out, "maas_submodel_jobs_total{{submodel=\"{n}\",outcome=\"{outcome}\"}} {v}");
        }
    }
    header(&mut out, "maas_submodel_batch_rows", "histogram", "Rows per batch.");
    for (n, s) in &m.submodels {
        histogram(&mut out, "maas_submodel_batch_rows", &format!("submodel=\"{}\"", escape(n)), &s.batch_rows);
    }
    header(
        &mut out,
        "maas_submodel_batches_total",
        "counter",
        "Batches dispatched, by decision: at_once (a stream was free and nothing more was expected soon, or the batch was full) or after_wait (held for rows expected soon).",
    );
    for (n, s) in &m.submodels {
        for (dispatch, v) in [("at_once", s.batches_at_once), ("after_wait", s.batches_waited)] {
            let _ =
                writeln!(out, "maas_submodel_batches_total{{submodel=\"{}\",dispatch=\"{dispatch}\"}} {v}", escape(n));
        }
    }
    header(
        &mut out,
        "maas_submodel_batch_wait_seconds",
        "histogram",
        "How long each held-back batch waited for rows expected soon.",
    );
    for (n, s) in &m.submodels {
        histogram(
            &mut out,
            "maas_submodel_batch_wait_seconds",
            &format!("submodel=\"{}\"", escape(n)),
            &s.wait_seconds,
        );
    }
    header(&mut out, "maas_submodel_compute_seconds", "histogram", "Compute time per batch.");
    for (n, s) in &m.submodels {
        histogram(
            &mut out,
            "maas_submodel_compute_seconds",
            &format!("submodel=\"{}\"", escape(n)),
            &s.compute_seconds,
        );
    }
    header(&mut out, "maas_submodel_version_info", "gauge", "The version each submodel serves now (always 1).");
    for (n, v) in &m.versions {
        let _ = writeln!(out, "maas_submodel_version_info{{submodel=\"{}\",version=\"{}\"}} 1", escape(n), escape(v));
    }
    header(&mut out, "maas_changes_total", "counter", "Changes attempted while serving (swap, rollback, recompose).");
    for change in ["swap", "rollback", "recompose"] {
        for result in ["ok", "rejected"] {
            let n = m.changes.get(&(change.to_string(), result.to_string())).copied().unwrap_or(0);
            let _ = writeln!(out, "maas_changes_total{{change=\"{change}\",result=\"{result}\"}} {n}");
        }
    }
    out
}
