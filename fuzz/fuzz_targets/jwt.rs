//! Identity (`src/identity.rs`): an `Authorization` header of any bytes is a user or a 401,
//! never a panic; a token signed with the secret whose claims are any bytes is accepted only
//! when its claims make it valid now (`sub` a valid id, `exp` not past, `nbf` absent or not
//! ahead, both numbers); a token of any `sub` signed now is that user exactly when the `sub` is a
//! valid id, and one changed byte of it is refused; the operator token is compared exactly.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, get_current_timestamp};
use libfuzzer_sys::fuzz_target;
use seckill_gateway::error::Reject;
use seckill_gateway::identity::{Identity, bearer, is_admin};
use seckill_gateway::ids::valid_id;
use serde_json::Value;

/// The secret of the seed tokens (fuzz/corpus/jwt).
const SECRET: &str = "fuzz-jwt-secret-0123456789";
const ADMIN_TOKEN: &str = "fuzz-admin-token-0123";
/// `Identity`'s leeway on `exp` and `nbf`, and a second for the clock moving during a run.
const LEEWAY: u64 = 5;
const SLACK: u64 = 1;

fuzz_target!(|data: &[u8]| {
    let identity = Identity::new(Some(SECRET));

    // 1. The bytes as the Authorization header.
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let headers = auth(value);
        if let Ok(user) = identity.user(&headers) {
            assert!(valid_id(&user));
        }
        let exact = bearer(&headers) == Some(ADMIN_TOKEN);
        assert_eq!(is_admin(&headers, Some(ADMIN_TOKEN)).is_ok(), exact);
        assert!(is_admin(&headers, None).is_err());
    }

    // 2. The bytes as the claims of a token signed with the secret.
    let before = get_current_timestamp();
    let answer = identity.user(&auth(bearer_of(&token(data))));
    let after = get_current_timestamp();
    if let Ok(user) = answer {
        // Only the claims the gateway reads: another (`iat`) may hold what `Value` cannot.
        let claims: Claims = serde_json::from_slice(data).expect("accepted claims are JSON");
        assert_eq!(claims.sub.as_ref().and_then(Value::as_str), Some(user.as_str()));
        let exp = claims.exp.as_ref().and_then(Value::as_f64).expect("exp: a number");
        assert!(
            exp + (LEEWAY + SLACK) as f64 >= before as f64,
            "expired at {exp}, now {before}"
        );
        match claims.nbf {
            None => {}
            Some(nbf) => {
                let nbf = nbf.as_f64().unwrap_or_else(|| panic!("accepted an nbf of {nbf}"));
                assert!(nbf <= (after + LEEWAY + SLACK) as f64, "valid from {nbf}, now {after}");
            }
        }
    } else {
        assert!(matches!(answer, Err(Reject::Unauthenticated(_))));
    }

    // 3. The bytes as the `sub` of a token valid for ten minutes.
    let sub = String::from_utf8_lossy(data);
    let claims = serde_json::json!({"sub": sub, "exp": before + 600});
    let token = token(claims.to_string().as_bytes());
    match identity.user(&auth(bearer_of(&token))) {
        Ok(user) => assert_eq!(user, sub),
        Err(_) => assert!(!valid_id(&sub), "{sub:?} refused"),
    }
    // Any one byte changed (where the input says, by what it says) is refused.
    let mut forged = token.into_bytes();
    let at = data.iter().map(|b| usize::from(*b)).sum::<usize>() % forged.len();
    forged[at] ^= data.first().copied().filter(|b| *b != 0).unwrap_or(1);
    if let Ok(value) = HeaderValue::from_bytes(&[b"Bearer ", &forged[..]].concat()) {
        assert!(
            identity.user(&auth(value)).is_err(),
            "byte {at} changed, still accepted"
        );
    }
});

/// The registered claims identity checks, as JSON values (`"nbf": null` is no `nbf`).
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
}

/// An HS256 token of `claims` (any bytes), signed with [`SECRET`].
fn token(claims: &[u8]) -> String {
    let signed = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims)
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256).expect("HMAC signs");
    format!("{signed}.{signature}")
}

fn bearer_of(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is a header value")
}

fn auth(value: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    headers
}
