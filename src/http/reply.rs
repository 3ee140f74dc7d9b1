//! JSON in and out: bounded body reading, replies, and refusals as `{"error","message"}`.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::error::Reject;

pub type Body = Full<Bytes>;

/// The contract's body limit.
pub const MAX_BODY: usize = 4096;

/// Read a request body of at most [`MAX_BODY`] bytes within `deadline`. The headers are
/// looked at now: the future keeps only the body (a handler's future carries it, and a
/// whole request in it would be moved with it).
pub fn read_body(
    req: http::Request<Incoming>,
    deadline: std::time::Duration,
) -> impl Future<Output = Result<Bytes, Reject>> + Send {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = declared.is_some_and(|n| n > MAX_BODY as u64);
    let body = req.into_body();
    async move {
        if too_large {
            return Err(Reject::PayloadTooLarge);
        }
        let collect = collect(Limited::new(body, MAX_BODY));
        tokio::pin!(collect);
        // A small body usually arrived with the headers: take it without arming a timer (one
        // timer per request is measurable on the hot path). Otherwise wait, bounded.
        let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
            Some(r) => r,
            None => match tokio::time::timeout(deadline, collect).await {
                Err(_) => return Err(Reject::BadRequest("request body not received in time".into())),
                Ok(r) => r,
            },
        };
        match collected {
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Reject::PayloadTooLarge),
            Err(_) => Err(Reject::BadRequest("could not read the request body".into())),
            Ok(bytes) => Ok(bytes),
        }
    }
}

/// A body's data frames as one `Bytes`: a body of one frame (the usual small JSON body) is
/// that frame itself, with no buffer list and no copy (`BodyExt::collect` builds a
/// `VecDeque` for it: ~500 instructions a request, callgrind). Trailers are ignored.
async fn collect<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut more: Option<bytes::BytesMut> = None;
    // Stop as soon as the body says it is complete: asking for one more frame after the
    // last one is a `Pending` and a wake-up of its own (measured: 1.35× → 1.58× the bare
    // server's CPU per sold-out answer), and it would also defeat `read_body`'s no-timer path.
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match (&mut more, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(head)) => {
                let mut buf = bytes::BytesMut::with_capacity(head.len() + data.len());
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
        }
    }
    Ok(more.map(bytes::BytesMut::freeze).or(first).unwrap_or_default())
}

/// Parse a JSON body, which must be an object; an empty body (no bytes) is `None`. A
/// refusal speaks the API's words (JSON types and the body's field names), never the
/// parser's Rust ones.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<Option<T>, Reject> {
    if body.is_empty() {
        return Ok(None);
    }
    // JSON's whitespace (not `u8::is_ascii_whitespace`, which takes a form feed too) may
    // come before the object; whitespace alone is no JSON (schemathesis sent `\x0c`, and
    // later ` `, and got a reservation each time).
    match body.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        // A struct would also take a JSON array of its fields in order (`[3]` as qty 3):
        // only an object is a body here. (Valid JSON starting with `{` is an object.)
        Some(b'{') => {}
        _ => return Err(Reject::BadRequest("the body must be a JSON object".into())),
    }
    // JSON is UTF-8, and `from_slice` checks it only in the strings it keeps: a field a
    // body type ignores (reserve's) could carry any bytes (found by the fuzz target
    // `json_body`).
    let Ok(body) = std::str::from_utf8(body) else {
        return Err(Reject::BadRequest("the body must be JSON in UTF-8".into()));
    };
    serde_json::from_str(body).map(Some).map_err(|e| {
        use serde_json::error::Category;
        Reject::BadRequest(match e.classify() {
            Category::Data => format!("bad body: {}", api_words(&e.to_string())),
            _ => format!("malformed JSON at line {} column {}", e.line(), e.column()),
        })
    })
}

/// A serde message in the API's words: JSON types for Rust ones (`expected i64` →
/// `expected an integer`), no struct names.
fn api_words(message: &str) -> String {
    const WORDS: [(&str, &str); 10] = [
        ("expected i64", "expected an integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected u16", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
        ("expected a string", "expected a string"),
        ("integer `", "the integer `"),
        ("invalid type: map", "invalid type: object"),
        ("invalid type: sequence", "invalid type: array"),
    ];
    let mut m = message.to_owned();
    for (rust, api) in WORDS {
        m = m.replace(rust, api);
    }
    // `expected struct Foo` / `expected enum Foo`: the shape, not our type's name.
    for kind in ["struct ", "enum "] {
        while let Some(at) = m.find(&format!("expected {kind}")) {
            let name_end = m[at + 9 + kind.len()..]
                .find(|c: char| !c.is_alphanumeric() && c != '_')
                .map_or(m.len(), |i| at + 9 + kind.len() + i);
            let shape = if kind == "struct " {
                "expected a JSON object"
            } else {
                "expected one of the listed values"
            };
            m.replace_range(at..name_end, shape);
        }
    }
    m
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn ok<T: Serialize>(value: &T) -> Response<Body> {
    json(StatusCode::OK, value)
}

pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

/// Bodies of the refusals whose text never varies: the hot early answers are written from
/// static bytes instead of being serialized per request.
fn fixed_body(r: &Reject) -> Option<&'static str> {
    Some(match r {
        Reject::SoldOut => r#"{"error":"sold_out","message":"sold out"}"#,
        Reject::Ended => r#"{"error":"ended","message":"the sale has ended"}"#,
        Reject::UnknownItem => r#"{"error":"unknown_item","message":"no such item"}"#,
        Reject::UnknownOrder => r#"{"error":"unknown_order","message":"no such order"}"#,
        Reject::RateLimited { .. } => r#"{"error":"rate_limited","message":"too many requests; retry later"}"#,
        Reject::PayloadTooLarge => r#"{"error":"payload_too_large","message":"request body over 4 KiB"}"#,
        _ => return None,
    })
}

/// A refusal as the contract's JSON, with `Retry-After` where it applies.
pub fn reject(r: &Reject) -> Response<Body> {
    let mut resp = match fixed_body(r) {
        Some(body) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *resp.status_mut() = r.status();
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        None => json(
            r.status(),
            &ErrorBody {
                error: r.code(),
                message: r.message(),
            },
        ),
    };
    if let Some(secs) = r.retry_after() {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the given frames (data, then maybe trailers).
    fn body(
        frames: Vec<hyper::body::Frame<Bytes>>,
    ) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames = frames.into_iter().map(Ok::<_, std::convert::Infallible>);
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn collect_joins_every_data_frame_and_skips_trailers() {
        use hyper::body::Frame;
        let one = collect(body(vec![Frame::data(Bytes::from_static(b"{\"qty\":1}"))])).await;
        assert_eq!(one.unwrap(), Bytes::from_static(b"{\"qty\":1}"));
        let three = collect(body(vec![
            Frame::data(Bytes::from_static(b"{\"q")),
            Frame::data(Bytes::from_static(b"ty\":")),
            Frame::trailers(http::HeaderMap::new()),
            Frame::data(Bytes::from_static(b"2}")),
        ]))
        .await;
        assert_eq!(three.unwrap(), Bytes::from_static(b"{\"qty\":2}"));
        assert_eq!(collect(body(vec![])).await.unwrap(), Bytes::new());
    }

    #[test]
    fn fixed_bodies_equal_the_serialized_ones() {
        for r in [
            Reject::SoldOut,
            Reject::Ended,
            Reject::UnknownItem,
            Reject::UnknownOrder,
            Reject::RateLimited { retry_after_s: 1 },
            Reject::PayloadTooLarge,
        ] {
            let serialized = serde_json::to_string(&ErrorBody {
                error: r.code(),
                message: r.message(),
            })
            .unwrap();
            assert_eq!(fixed_body(&r), Some(serialized.as_str()));
        }
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct QtyBody {
        qty: Option<i64>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Flag {
        restock: bool,
    }

    fn refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(body: &str) -> String {
        match parse_json::<T>(body.as_bytes()) {
            Err(Reject::BadRequest(why)) => why,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn only_a_json_object_is_a_body_and_refusals_speak_the_apis_words() {
        assert!(parse_json::<QtyBody>(b"").unwrap().is_none());
        for no_json in [" ", " \t\r\n", "\x0c", "\x0c{}"] {
            assert_eq!(
                refused::<QtyBody>(no_json),
                "the body must be a JSON object",
                "{no_json:?}"
            );
        }
        assert_eq!(parse_json::<QtyBody>(b" {\"qty\": 3}").unwrap().unwrap().qty, Some(3));
        for not_object in ["[3]", "3", "\"x\"", "null", "true"] {
            assert_eq!(
                refused::<QtyBody>(not_object),
                "the body must be a JSON object",
                "{not_object}"
            );
        }
        for (body, words) in [
            ("{\"qty\": \"x\"}", "expected an integer"),
            ("{\"qty\": 1.5}", "expected an integer"),
            ("{\"qty\": [1]}", "invalid type: array"),
            ("{\"qty\": {}}", "invalid type: object"),
            ("{\"quantity\": 1}", "unknown field `quantity`"),
            ("{\"qty\": 1", "malformed JSON at line 1"),
        ] {
            let why = refused::<QtyBody>(body);
            assert!(why.contains(words), "{body}: {why}");
            for rust in ["i64", "struct", "QtyBody", "Option", "u32"] {
                assert!(!why.contains(rust), "{body}: {why}");
            }
        }
        // Not UTF-8 (JSON is), even in a field the body type ignores (reserve's ignores all
        // but qty): serde_json alone would take it.
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Lenient {
            qty: i64,
        }
        let body = b"{\"note\": \"\xff\", \"qty\": 2}";
        assert!(serde_json::from_slice::<Lenient>(body).is_ok());
        assert_eq!(
            parse_json::<Lenient>(body).unwrap_err(),
            Reject::BadRequest("the body must be JSON in UTF-8".into())
        );
        let why = refused::<Flag>("{}");
        assert!(why.contains("missing field `restock`"), "{why}");
        let why = refused::<Flag>("{\"restock\": \"yes\"}");
        assert!(why.contains("expected a boolean"), "{why}");
    }
}
