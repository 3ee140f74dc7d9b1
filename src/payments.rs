//! The payment provider's callback (`POST /webhooks/payments`): its signature and its body.
//!
//! Signed as the common providers sign theirs: the header `X-Seckill-Signature:
//! t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`. The timestamp is inside
//! the signed text, so a captured callback cannot be replayed later with a new one; one more
//! than [`TOLERANCE_S`] away from this host's clock is refused. Several `v1` entries may be
//! given (a provider rotating its secret signs with both): any one that matches will do. The
//! comparison is the `hmac` crate's constant-time one.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// How far the callback's timestamp may be from this host's clock, either way.
pub const TOLERANCE_S: i64 = 300;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-seckill-signature";

/// Why a signature is refused (the `message` of a 401 `bad_signature`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    Stale,
    Future,
    Mismatch,
}

impl Refused {
    pub fn why(self) -> &'static str {
        match self {
            Refused::Missing => "no X-Seckill-Signature header",
            Refused::Malformed => "the signature header is not t=<unix seconds>,v1=<hex>",
            Refused::Stale => "the signature's timestamp is more than 5 minutes old",
            Refused::Future => "the signature's timestamp is more than 5 minutes ahead",
            Refused::Mismatch => "the signature does not match the body",
        }
    }
}

/// The signature of `body` at `t`, as the provider computes it (hex); tests and tools sign
/// with it.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    hex::encode(mac(secret, t, body).finalize().into_bytes())
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// Check the header `header` (`None`: absent) against `body`, at `now_s` (unix seconds).
pub fn verify(secret: &[u8], header: Option<&[u8]>, body: &[u8], now_s: i64) -> Result<(), Refused> {
    let header = std::str::from_utf8(header.ok_or(Refused::Missing)?).map_err(|_| Refused::Malformed)?;
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| Refused::Malformed)?),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| Refused::Malformed)?),
            // Other schemes (a provider's future ones) are ignored, as the providers do.
            Some(_) => {}
            None => return Err(Refused::Malformed),
        }
    }
    let t = t.ok_or(Refused::Malformed)?;
    if sigs.is_empty() {
        return Err(Refused::Malformed);
    }
    if t < now_s.saturating_sub(TOLERANCE_S) {
        return Err(Refused::Stale);
    }
    if t > now_s.saturating_add(TOLERANCE_S) {
        return Err(Refused::Future);
    }
    let expected = mac(secret, t, body);
    if sigs.iter().any(|s| expected.clone().verify_slice(s).is_ok()) {
        Ok(())
    } else {
        Err(Refused::Mismatch)
    }
}

/// What the provider reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    Succeeded,
    Failed,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
        }
    }
}

/// The callback's body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: i64,
    pub status: PaymentStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret_0123";
    const NOW: i64 = 1_800_000_000;

    fn header(t: i64, sig: &str) -> String {
        format!("t={t},v1={sig}")
    }

    #[test]
    fn a_signature_of_the_body_at_a_recent_time_is_accepted() {
        let body = br#"{"payment_id":"p1"}"#;
        let h = header(NOW - 10, &sign(SECRET, NOW - 10, body));
        assert_eq!(verify(SECRET, Some(h.as_bytes()), body, NOW), Ok(()));
        // A rotation: the old secret's signature beside the new one.
        let both = format!("t={NOW},v1={},v1={}", sign(b"old", NOW, body), sign(SECRET, NOW, body));
        assert_eq!(verify(SECRET, Some(both.as_bytes()), body, NOW), Ok(()));
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let body = br#"{"payment_id":"p1"}"#;
        let good = sign(SECRET, NOW, body);
        let cases: Vec<(Option<String>, &[u8], Refused)> = vec![
            (None, body, Refused::Missing),
            (Some("v1=abcd".into()), body, Refused::Malformed),
            (Some(format!("t={NOW}")), body, Refused::Malformed),
            (Some(format!("t=soon,v1={good}")), body, Refused::Malformed),
            (Some(format!("t={NOW},v1=zz")), body, Refused::Malformed),
            (Some("garbage".into()), body, Refused::Malformed),
            (Some(header(NOW, &good)), br#"{"payment_id":"p2"}"#, Refused::Mismatch),
            (
                Some(header(NOW, &sign(b"another secret", NOW, body))),
                body,
                Refused::Mismatch,
            ),
            (Some(header(NOW + 1, &good)), body, Refused::Mismatch),
            (
                Some(header(
                    NOW - TOLERANCE_S - 1,
                    &sign(SECRET, NOW - TOLERANCE_S - 1, body),
                )),
                body,
                Refused::Stale,
            ),
            (
                Some(header(
                    NOW + TOLERANCE_S + 1,
                    &sign(SECRET, NOW + TOLERANCE_S + 1, body),
                )),
                body,
                Refused::Future,
            ),
        ];
        for (h, b, want) in cases {
            assert_eq!(
                verify(SECRET, h.as_deref().map(str::as_bytes), b, NOW),
                Err(want),
                "{h:?}"
            );
        }
    }
}
