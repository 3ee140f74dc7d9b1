//! Stage 1 — who is asking. A shopper is identified by the `sub` of an HS256 JWT when a
//! secret is configured, otherwise by the `X-User-Id` header that a trusted proxy sets.

use http::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::error::Reject;
use crate::ids::valid_id;

pub enum Identity {
    /// Verify `Authorization: Bearer <JWT>`; the key is built once at start-up.
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
    /// Trust `X-User-Id` (a proxy in front authenticated the shopper).
    TrustedHeader,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Checked here again: `jsonwebtoken` checks an `nbf` only when it reads it as whole
    /// seconds below 2^64, and lets any other (`"4102444800"`, `1e30`) through. Not a
    /// number: the claims do not parse, and the token is refused. (A token whose `exp` it
    /// cannot read it refuses itself.)
    #[serde(default)]
    nbf: Option<f64>,
}

impl Identity {
    pub fn new(jwt_secret: Option<&str>) -> Self {
        match jwt_secret {
            Some(secret) => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = 5;
                // A token valid from later (`nbf`) is refused until then, as an expired one.
                validation.validate_nbf = true;
                Identity::Jwt {
                    key: Box::new(DecodingKey::from_secret(secret.as_bytes())),
                    validation: Box::new(validation),
                }
            }
            None => Identity::TrustedHeader,
        }
    }

    /// The user id of a request, or `unauthenticated`.
    pub fn user(&self, headers: &HeaderMap) -> Result<String, Reject> {
        let user = match self {
            Identity::Jwt { key, validation } => {
                let token = bearer(headers).ok_or(Reject::Unauthenticated("missing bearer token"))?;
                let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|_| Reject::Unauthenticated("invalid or expired token"))?
                    .claims;
                let valid_from = (jsonwebtoken::get_current_timestamp() + validation.leeway) as f64;
                if claims.nbf.is_some_and(|nbf| nbf > valid_from) {
                    return Err(Reject::Unauthenticated("invalid or expired token"));
                }
                claims.sub
            }
            Identity::TrustedHeader => headers
                .get(X_USER_ID)
                .and_then(|v| v.to_str().ok())
                .ok_or(Reject::Unauthenticated("missing X-User-Id header"))?
                .to_owned(),
        };
        if valid_id(&user) {
            Ok(user)
        } else {
            Err(Reject::Unauthenticated("user id must be 1-64 chars of [A-Za-z0-9_.:-]"))
        }
    }
}

/// The trusted-proxy mode's header. A constant: a name given as a string is parsed (and
/// looked up among the standard names) on every request.
const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the request carries the operator token. Compared in constant time.
pub fn is_admin(headers: &HeaderMap, admin_token: Option<&str>) -> Result<(), Reject> {
    let Some(expected) = admin_token else {
        return Err(Reject::Forbidden("admin API disabled: SECKILL_ADMIN_TOKEN is not set"));
    };
    let given = bearer(headers).unwrap_or("");
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Reject::Forbidden("admin token required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn jwt_sub_is_the_user() {
        let secret = "0123456789abcdef0123";
        let id = Identity::new(Some(secret));
        let exp = (crate::clock::system_now_ms() / 1000 + 60) as usize;
        let claims = serde_json::json!({"sub": "alice", "exp": exp});
        let token = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let auth = format!("Bearer {token}");
        assert_eq!(id.user(&headers(&[("authorization", &auth)])).unwrap(), "alice");
        // Wrong secret, expired, missing: all 401.
        let forged = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"another-secret-123"),
        )
        .unwrap();
        let auth = format!("Bearer {forged}");
        assert!(matches!(
            id.user(&headers(&[("authorization", &auth)])),
            Err(Reject::Unauthenticated(_))
        ));
        let old = serde_json::json!({"sub": "alice", "exp": 1000});
        let expired = encode(&Header::default(), &old, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
        let auth = format!("Bearer {expired}");
        assert!(id.user(&headers(&[("authorization", &auth)])).is_err());
        assert!(
            id.user(&headers(&[("x-user-id", "alice")])).is_err(),
            "header ignored in JWT mode"
        );
    }

    /// An `nbf` ahead is refused whatever its form: `jsonwebtoken` checks one only when it
    /// reads whole seconds below 2^64, and let a string or `1e30` through unchecked (found
    /// by the fuzz target `jwt`). One that is not a number is refused.
    #[test]
    fn an_nbf_ahead_in_any_form_or_not_a_number_is_refused() {
        let secret = "0123456789abcdef0123";
        let id = Identity::new(Some(secret));
        let now = crate::clock::system_now_ms() / 1000;
        let user = |nbf: serde_json::Value| {
            let claims = serde_json::json!({"sub": "alice", "exp": now + 600, "nbf": nbf});
            let token = encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap();
            id.user(&headers(&[("authorization", &format!("Bearer {token}"))]))
        };
        for nbf in [
            serde_json::json!(now - 60),
            serde_json::json!((now - 60) as f64 + 0.5),
            serde_json::Value::Null,
        ] {
            assert_eq!(user(nbf.clone()).unwrap(), "alice", "nbf {nbf}");
        }
        for nbf in [
            serde_json::json!(now + 3600),
            serde_json::json!((now + 3600) as f64 + 0.5),
            serde_json::json!(1.0e30),
            serde_json::json!(format!("{}", now + 3600)),
            serde_json::json!(format!("{}", now - 60)),
            serde_json::json!(true),
        ] {
            assert!(user(nbf.clone()).is_err(), "nbf {nbf}");
        }
    }

    #[test]
    fn trusted_header_is_validated() {
        let id = Identity::new(None);
        assert_eq!(id.user(&headers(&[("x-user-id", "u-1")])).unwrap(), "u-1");
        assert!(id.user(&headers(&[("x-user-id", "bad user")])).is_err());
        assert!(id.user(&HeaderMap::new()).is_err());
    }

    #[test]
    fn admin_token_checks() {
        assert!(
            is_admin(
                &headers(&[("authorization", "Bearer sekret-token")]),
                Some("sekret-token")
            )
            .is_ok()
        );
        assert!(
            is_admin(
                &headers(&[("authorization", "Bearer sekret-tokex")]),
                Some("sekret-token")
            )
            .is_err()
        );
        assert!(is_admin(&headers(&[("authorization", "Bearer sekret-token")]), None).is_err());
    }
}
