//! What every target asks of a refusal: it is `bad_request` (or the given code) in the API's
//! words, never the parser's Rust ones (issue 15: "expected struct ReserveBody").

use seckill_gateway::error::Reject;

/// Words of the Rust side that a refusal must not show a client.
const RUST_WORDS: &[&str] = &[
    "i64",
    "u64",
    "u32",
    "i32",
    "u16",
    "f64",
    "usize",
    "struct ",
    "enum ",
    "Option",
    "Body",
    "ListQuery",
    "PaymentStatus",
    "LimitsChange",
    "ItemSpec",
];

/// `reject` is a `bad_request` whose message speaks the API's words. What the client sent
/// comes back quoted (an unknown field `\u0066\u0036\u0034` is `f64`) and is not looked at.
pub fn bad_request_in_api_words(reject: &Reject, input: &[u8]) {
    assert!(matches!(reject, Reject::BadRequest(_)), "not bad_request: {reject:?}");
    let message = reject.message();
    let sent = String::from_utf8_lossy(input);
    let ours = ours(&message);
    for word in RUST_WORDS {
        assert!(
            !ours.contains(word) || sent.contains(word.trim()),
            "{message:?} shows the Rust word {word:?}"
        );
    }
}

/// `message` without what the client wrote: a field or variant name (serde quotes it in
/// backticks, unescaped, so it is cut up to the message's last backtick: the rest of that
/// stretch is our list of names) and a string value (Debug-quoted: escaped inside).
fn ours(message: &str) -> String {
    let mut m = message.to_owned();
    for marker in ["field `", "variant `"] {
        if let Some(start) = m.find(marker) {
            let end = m.rfind('`').filter(|e| *e > start + marker.len()).unwrap_or(m.len());
            m.replace_range(start..end, "");
        }
    }
    let (mut out, mut inside, mut chars) = (String::new(), false, m.chars());
    while let Some(c) = chars.next() {
        match (inside, c) {
            (true, '\\') => {
                chars.next();
            }
            (_, '"') => inside = !inside,
            (false, c) => out.push(c),
            (true, _) => {}
        }
    }
    out
}
