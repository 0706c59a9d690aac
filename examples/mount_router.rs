//! Mounting maas inside a service's own axum app: `maas::http::router(engine)` is an ordinary
//! `Router`, nested here under `/ml` beside the service's own routes.
//!
//! The program starts the app on a free loopback port, calls both its own route and a maas
//! route over HTTP, prints the answers and exits.
//!
//! ```sh
//! cargo run --example mount_router
//! ```

use axum::Router;
use axum::routing::get;
use maas_engine::Engine;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let graph = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipelines/digits.toml");
    let engine = Engine::from_files(&[graph]).await?;
    let app =
        Router::new().route("/", get(|| async { "my service\n" })).nest("/ml", maas::http::router(engine.clone()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::new();
    let own = client.get(format!("http://{addr}/")).send().await?.text().await?;
    println!("GET /            -> {}", own.trim());
    let pixels = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/inputs/digits.json"))?;
    let answer: serde_json::Value = client
        .post(format!("http://{addr}/ml/v1/pipelines/classify/infer"))
        .body(format!(r#"{{"inputs": {{"pixels": {pixels}}}}}"#))
        .send()
        .await?
        .json()
        .await?;
    println!("POST /ml/v1/pipelines/classify/infer -> labels {}", answer["outputs"]["label"]);
    let ready = client.get(format!("http://{addr}/ml/readyz")).send().await?.status();
    println!("GET /ml/readyz   -> {ready}");

    server.abort();
    engine.shutdown().await;
    Ok(())
}
