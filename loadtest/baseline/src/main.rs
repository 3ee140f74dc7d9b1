//! The machine's ceiling: a bare hyper 1.x HTTP/1 server that reads and discards the
//! request body and answers every request 200 with a fixed ~60-byte JSON body.
//! Usage: seckill-baseline [ADDR]   (default 127.0.0.1:0; prints `listening on ADDR` first)
use std::convert::Infallible;
use std::io::Write;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"order_id":"0","item_id":"demo","status":"reserved"}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read and drop the body, as the gateway has to.
    let _ = req.into_body().collect().await;
    let resp = Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY)))
        .expect("static response");
    Ok(resp)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // e.g. EMFILE: back off briefly, keep serving the connections we have
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}
