//! The payment webhook (`src/payments.rs`, `src/http/webhook.rs`). The input is a callback:
//! its `X-Seckill-Signature` header, a newline, its body (fuzz/corpus/webhook holds real
//! ones, signed with [`SECRET`] at [`NOW`]). Any header and body are checked without a
//! panic, and accepted only when one `v1` is the HMAC of `<t>.<body>` for a `t` within the
//! tolerance; an accepted body is then read as the handler reads it. And the input as a
//! body: signed, it verifies; any one byte of the body or of the signature changed, it
//! does not; too old or too new, it does not.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use seckill_gateway::payments::{Refused, TOLERANCE_S, sign, verify};

const SECRET: &[u8] = b"whsec_fuzz_0123456789";
/// The clock of the seed callbacks (2025-12-01T10:00:00Z).
const NOW: i64 = 1_764_583_200;

fuzz_target!(|data: &[u8]| {
    // 1. A callback as it arrives.
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    match verify(SECRET, header, body, NOW) {
        Ok(()) => {
            let header = std::str::from_utf8(header.expect("accepted: a header")).expect("UTF-8");
            let t = header
                .split(',')
                .filter_map(|p| p.trim().strip_prefix("t="))
                .last()
                .and_then(|t| t.parse::<i64>().ok())
                .expect("accepted: a t");
            assert!((NOW - t).abs() <= TOLERANCE_S, "t={t}");
            let expected = sign(SECRET, t, body);
            assert!(
                header
                    .split(',')
                    .filter_map(|p| p.trim().strip_prefix("v1="))
                    .any(|v| v.eq_ignore_ascii_case(&expected)),
                "accepted {header:?} without the signature {expected}"
            );
            match seckill_gateway::http::fuzz::payment(body) {
                Ok(p) => assert!(!p.payment_id.is_empty()),
                Err(reject) => common::bad_request_in_api_words(&reject, body),
            }
        }
        Err(Refused::Missing) => assert!(header.is_none()),
        Err(_) => {}
    }

    // 2. The whole input as a body, signed now.
    let t = NOW - 7;
    let signature = sign(SECRET, t, data);
    let header = format!("t={t},v1={signature}");
    assert_eq!(verify(SECRET, Some(header.as_bytes()), data, NOW), Ok(()));
    // Another provider's scheme beside it changes nothing.
    let more = format!("v0=abc, {header} ,v2=zz");
    assert_eq!(verify(SECRET, Some(more.as_bytes()), data, NOW), Ok(()));
    let flip = data.first().copied().filter(|b| *b != 0).unwrap_or(0x20);
    if !data.is_empty() {
        let mut changed = data.to_vec();
        let at = usize::from(flip) % changed.len();
        changed[at] ^= flip;
        assert_eq!(
            verify(SECRET, Some(header.as_bytes()), &changed, NOW),
            Err(Refused::Mismatch)
        );
    }
    let mut mac = hex::decode(&signature).expect("hex");
    let at = usize::from(flip) % mac.len();
    mac[at] ^= flip;
    let forged = format!("t={t},v1={}", hex::encode(&mac));
    assert_eq!(
        verify(SECRET, Some(forged.as_bytes()), data, NOW),
        Err(Refused::Mismatch)
    );
    let later = NOW + TOLERANCE_S + 1 + i64::from(flip);
    assert_eq!(
        verify(SECRET, Some(header.as_bytes()), data, later + 7),
        Err(Refused::Stale)
    );
    let earlier = NOW - TOLERANCE_S - 1 - i64::from(flip);
    assert_eq!(
        verify(SECRET, Some(header.as_bytes()), data, earlier - 7),
        Err(Refused::Future)
    );
});
