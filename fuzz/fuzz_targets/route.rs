//! The router (`src/http/router.rs`): a request target's path is routed exactly as
//! `router::TEMPLATES` say, the byte split cuts where `split('/')` does, a valid id
//! round-trips through every template, and the `?limit=` of `GET /api/v1/orders` is 1-100
//! or a refusal in the API's words.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use seckill_gateway::http::fuzz::list_limit;
use seckill_gateway::http::router::{TEMPLATES, route_of, segments};
use seckill_gateway::ids::{bucket_id, order_shard, split_bucket, valid_id};

fuzz_target!(|data: &[u8]| {
    // What hyper hands the router: a parsed request target's path and query.
    if let Ok(uri) = http::Uri::try_from(data) {
        check_route(uri.path());
        check_limit(uri.query(), data);
    }
    // Any text as a path (the router takes any &str), and as an id.
    let text = String::from_utf8_lossy(data);
    check_route(&text);
    check_id(&text);
});

/// A template's id in `path`, when the path is the template with one segment for its
/// `{item_id}` / `{order_id}` (`Some(None)`: a template without an id that is the path).
fn matches<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    if t.len() != p.len() {
        return None;
    }
    let mut id = None;
    for (t, p) in t.iter().zip(&p) {
        if t.starts_with('{') {
            id = Some(*p);
        } else if t != p {
            return None;
        }
    }
    Some(id)
}

fn check_route(path: &str) {
    let trimmed = path.trim_start_matches('/');
    let expected: Vec<&str> = trimmed.split('/').collect();
    match segments(path) {
        Some((segs, n)) => assert_eq!(&segs[..n], &expected[..], "{path:?}"),
        None => assert!(expected.len() > 5, "{path:?}: {} segments refused", expected.len()),
    }
    // Leading slashes do not count (`//metrics` is `/metrics`).
    let canonical = format!("/{trimmed}");
    let found: Vec<(&str, Option<&str>)> = TEMPLATES
        .iter()
        .filter_map(|(method, template)| matches(template, &canonical).map(|id| (*method, id)))
        .collect();
    let (label, method, id) = route_of(path);
    if label == "not_found" {
        assert!(found.is_empty(), "{path:?} is {found:?} yet not found");
        assert_eq!(id, None);
    } else {
        assert_eq!(found.len(), 1, "{path:?} ({label}) is {found:?}");
        assert_eq!(found[0], (method.as_str(), id), "{path:?} ({label})");
    }
}

fn check_id(id: &str) {
    let _ = order_shard(id);
    if !valid_id(id) {
        return;
    }
    // A valid id names a route's resource in every template, and becomes a header as it is
    // (the router echoes a valid X-Request-Id).
    for (method, template) in TEMPLATES {
        let Some(at) = template.find('{') else { continue };
        let end = at + template[at..].find('}').expect("a closed placeholder") + 1;
        let path = format!("{}{id}{}", &template[..at], &template[end..]);
        let (label, m, got) = route_of(&path);
        assert_ne!(label, "not_found", "{path:?}");
        assert_eq!((m.as_str(), got), (*method, Some(id)), "{path:?}");
    }
    assert!(http::HeaderValue::from_str(id).is_ok(), "{id:?}");
    // `#` is outside the charset: an item's bucket ids split back into it.
    for b in [0, 1, 7, 64] {
        assert_eq!(split_bucket(&bucket_id(id, b)), (id, b), "{id:?} bucket {b}");
    }
}

fn check_limit(query: Option<&str>, data: &[u8]) {
    match list_limit(query) {
        Ok(n) => assert!((1..=100).contains(&n), "{query:?}: limit {n}"),
        Err(reject) => common::bad_request_in_api_words(&reject, data),
    }
}
