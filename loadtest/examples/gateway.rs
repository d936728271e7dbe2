//! An HTTP gateway in front of the processors, so that the seed's `wrk` benchmark of a web
//! service can be repeated: `POST /{task}` with a JSON request body is forwarded to NATS on
//! `{prefix}.{task}` and the processor's JSON reply comes back (error replies with their code
//! as the HTTP status).
//!
//!   cargo run --release -p loadtest --example gateway -- --listen 127.0.0.1:8080
//!   wrk -t2 -c64 -d30s -s loadtest/wrk-post.lua http://127.0.0.1:8080/embed

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use clap::Parser;
use schemas::headers;

/// Forwards HTTP POSTs to the processors over NATS.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    server: String,
    /// Subject prefix of the service.
    #[arg(long, default_value = schemas::DEFAULT_SUBJECT_PREFIX)]
    prefix: String,
}

#[derive(Clone)]
struct Gateway {
    nats: async_nats::Client,
    prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One server or several, comma-separated (async-nats takes several as a slice).
    let (options, servers) =
        producer::nats_options(&args.server).map_err(|e| anyhow::anyhow!("{e}"))?;
    let nats = options
        .request_timeout(Some(Duration::from_secs(30)))
        .connect(servers.as_slice())
        .await?;
    let gateway = Gateway {
        nats,
        prefix: args.prefix,
    };
    let app = axum::Router::new()
        .route("/{task}", post(forward))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!(
        "gateway on http://{}/{{embed,fill_mask}}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn forward(
    State(gateway): State<Gateway>,
    Path(task): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let mut request_headers = async_nats::HeaderMap::new();
    request_headers.insert(headers::CONTENT_TYPE, schemas::media_types::JSON);
    let subject = format!("{}.{task}", gateway.prefix);
    match gateway
        .nats
        .request_with_headers(subject, request_headers, body)
        .await
    {
        Ok(reply) => {
            let status = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
                .and_then(|code| code.as_str().parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
                .unwrap_or(StatusCode::OK);
            (
                status,
                [(header::CONTENT_TYPE, schemas::media_types::JSON)],
                reply.payload,
            )
        }
        Err(err) => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/plain")],
            Bytes::from(format!("no reply from the processors: {err}\n")),
        ),
    }
}
