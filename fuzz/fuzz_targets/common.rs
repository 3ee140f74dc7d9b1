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

/// `reject` is a `bad_request` whose message speaks the API's words. A word the client sent
/// itself (an unknown field called `i64`) may come back.
pub fn bad_request_in_api_words(reject: &Reject, input: &[u8]) {
    assert!(matches!(reject, Reject::BadRequest(_)), "not bad_request: {reject:?}");
    let message = reject.message();
    let sent = String::from_utf8_lossy(input);
    for word in RUST_WORDS {
        assert!(
            !message.contains(word) || sent.contains(word.trim()),
            "{message:?} shows the Rust word {word:?}"
        );
    }
}
