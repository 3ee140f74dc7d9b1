//! The OpenAPI document (issue 15, acceptance 1): `docs/openapi.json` is valid OpenAPI 3.1
//! (checked by `openapi-spec-validator`, from PyPI: `./scripts/test` installs it), it
//! describes exactly the routes the router has, and the gateway serves it at
//! `GET /openapi.json`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::RedisServer;
use common::gateway::Gateway;
use serde_json::Value;

fn document() -> (PathBuf, Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json");
    (path, serde_json::from_str(&text).expect("docs/openapi.json is JSON"))
}

/// The validator's Python: `SECKILL_OAS_PYTHON` (the virtualenv `./scripts/test` makes),
/// else `python3`.
fn python() -> String {
    std::env::var("SECKILL_OAS_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let (path, doc) = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let out = Command::new(python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}): run ./scripts/test, or pip install openapi-spec-validator",
                python()
            )
        });
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "openapi-spec-validator: {printed}\n(not installed? run ./scripts/test, or pip install openapi-spec-validator and set SECKILL_OAS_PYTHON)"
    );
    assert!(printed.contains("OK"), "{printed}");
}

#[test]
fn the_document_describes_exactly_the_routes() {
    let (_, doc) = document();
    let mut described = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            described.insert((method.to_uppercase(), path.clone()));
            let responses = op["responses"].as_object().expect("responses");
            assert!(responses.contains_key("200"), "{method} {path}: no 200");
            assert!(responses.contains_key("405"), "{method} {path}: no 405");
        }
    }
    let routed: BTreeSet<(String, String)> = seckill_gateway::http::router::TEMPLATES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let missing: Vec<_> = routed.difference(&described).collect();
    let extra: Vec<_> = described.difference(&routed).collect();
    assert!(missing.is_empty(), "routes the document does not describe: {missing:?}");
    assert!(
        extra.is_empty(),
        "routes described that the router does not have: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_document() {
    let redis = RedisServer::start();
    let gw = Gateway::builder(&redis.url()).start().await;
    let r = common::http::send(gw.get("/openapi.json")).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json, document().1);
}
