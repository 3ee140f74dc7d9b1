//! Refusals and failures, and the one place that turns them into HTTP statuses.
//!
//! A [`Reject`] is an expected answer: sold out, rate limited, not started. It is not an
//! error and is never logged as one. An [`Error`] is a failure, and records which side
//! caused it (the pattern of pingora-error's `ErrorSource`): Redis, the store, or us.
//! Both become `{"error": code, "message": text}`; [`Reject::status`] is the only mapping
//! from refusal to status code in the crate.

use http::StatusCode;

/// An expected refusal. Each variant is one `error` code of the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    BadRequest(String),
    Unauthenticated(&'static str),
    Forbidden(&'static str),
    UnknownItem,
    UnknownOrder,
    LimitReached {
        held: i64,
        limit: i64,
    },
    OrderClosed {
        status: &'static str,
    },
    SoldOut,
    NotStarted {
        starts_at_ms: i64,
    },
    Ended,
    PayloadTooLarge,
    /// `retry_after_s` goes in the `Retry-After` header.
    RateLimited {
        retry_after_s: u64,
    },
    /// The operator paused this sale, or every sale.
    Paused,
    /// Redis or the store unreachable, circuit open, or shedding load.
    Unavailable {
        retry_after_s: u64,
        reason: &'static str,
    },
    /// A payment callback without a valid signature (missing, wrong, stale or future).
    BadSignature(&'static str),
    /// A payment callback whose amount is not what the order costs.
    AmountMismatch {
        expected_cents: i64,
        got_cents: i64,
    },
    NotFound,
    MethodNotAllowed,
    Internal,
}

impl Reject {
    /// The contract's `error` code, also the `outcome` label of `seckill_requests_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::BadRequest(_) => "bad_request",
            Reject::Unauthenticated(_) => "unauthenticated",
            Reject::Forbidden(_) => "forbidden",
            Reject::UnknownItem => "unknown_item",
            Reject::UnknownOrder => "unknown_order",
            Reject::LimitReached { .. } => "limit_reached",
            Reject::OrderClosed { .. } => "order_closed",
            Reject::SoldOut => "sold_out",
            Reject::NotStarted { .. } => "not_started",
            Reject::Ended => "ended",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::Paused => "paused",
            Reject::Unavailable { .. } => "unavailable",
            Reject::BadSignature(_) => "bad_signature",
            Reject::AmountMismatch { .. } => "amount_mismatch",
            Reject::NotFound => "not_found",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::Internal => "internal",
        }
    }

    /// The one refusal → status mapping.
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::Unauthenticated(_) | Reject::BadSignature(_) => StatusCode::UNAUTHORIZED,
            Reject::Forbidden(_) => StatusCode::FORBIDDEN,
            Reject::UnknownItem | Reject::UnknownOrder | Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::LimitReached { .. } | Reject::OrderClosed { .. } | Reject::AmountMismatch { .. } => {
                StatusCode::CONFLICT
            }
            Reject::SoldOut | Reject::Ended => StatusCode::GONE,
            Reject::NotStarted { .. } => StatusCode::TOO_EARLY,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reject::Unavailable { .. } | Reject::Paused => StatusCode::SERVICE_UNAVAILABLE,
            Reject::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reject::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds for the `Retry-After` header, where the contract asks for one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Reject::RateLimited { retry_after_s } | Reject::Unavailable { retry_after_s, .. } => Some(*retry_after_s),
            Reject::Paused => Some(PAUSED_RETRY_AFTER_S),
            _ => None,
        }
    }

    /// Human text for the `message` field.
    pub fn message(&self) -> String {
        match self {
            Reject::BadRequest(why) => why.clone(),
            Reject::Unauthenticated(why) => (*why).to_owned(),
            Reject::Forbidden(why) => (*why).to_owned(),
            Reject::UnknownItem => "no such item".to_owned(),
            Reject::UnknownOrder => "no such order".to_owned(),
            Reject::LimitReached { held, limit } => {
                format!("you already hold {held} of the {limit} units allowed per shopper")
            }
            Reject::OrderClosed { status } => format!("the order is {status}"),
            Reject::SoldOut => "sold out".to_owned(),
            Reject::NotStarted { starts_at_ms } => {
                format!("the sale starts at {}", crate::clock::rfc3339(*starts_at_ms))
            }
            Reject::Ended => "the sale has ended".to_owned(),
            Reject::PayloadTooLarge => "request body over 4 KiB".to_owned(),
            Reject::RateLimited { .. } => "too many requests; retry later".to_owned(),
            Reject::Paused => "the sale is paused by the operator; retry later".to_owned(),
            Reject::Unavailable { reason, .. } => format!("temporarily unavailable: {reason}"),
            Reject::BadSignature(why) => format!("payment callback refused: {why}"),
            Reject::AmountMismatch {
                expected_cents,
                got_cents,
            } => format!("the order costs {expected_cents} cents, the payment is of {got_cents}"),
            Reject::NotFound => "no such route".to_owned(),
            Reject::MethodNotAllowed => "method not allowed on this route".to_owned(),
            Reject::Internal => "internal error".to_owned(),
        }
    }
}

/// `Retry-After` of a paused sale: a pause is an operator's decision of unknown length, so
/// shoppers' retries are spread over a few seconds rather than hammering the gateway.
pub const PAUSED_RETRY_AFTER_S: u64 = 5;

/// Which side a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Redis,
    Store,
    Internal,
}

/// A failure: something did not work, as opposed to an expected refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("redis call timed out")]
    RedisTimeout,
    #[error("redis connection: {0}")]
    RedisConnection(String),
    /// Redis answered with an error reply (`code` is its first word: `BUSYGROUP`,
    /// `NOSCRIPT`, `LOADING`, `ERR`, …).
    #[error("redis answered {code}: {detail}")]
    RedisRefused { code: String, detail: String },
    #[error("redis script reply not understood: {0}")]
    ScriptReply(String),
    #[error("circuit open: redis failing, not called")]
    CircuitOpen,
    #[error("shedding load: too many redis calls in flight")]
    Shed,
    /// `SECKILL_REDIS_WAIT_REPLICAS`: the change is made on the primary, but not enough
    /// replicas confirmed it in time (a failover now could lose it).
    #[error("redis replicas behind: {acked} of {wanted} confirmed the write")]
    NotReplicated { acked: i64, wanted: u32 },
    /// A script refused to touch a shard whose Redis is behind the database (it lost writes)
    /// or is being rebuilt ([`crate::engine::seq`]): `FENCED <why>`.
    #[error("redis shard fenced: {0}")]
    Fenced(String),
    /// A bucketed item's stock is on its way between buckets (a transfer not yet credited,
    /// e.g. of a gateway that died between its two steps) and the request's time ran out
    /// before it arrived: neither a reservation nor a true `sold_out` can be answered.
    #[error("stock in transit between buckets")]
    InTransit,
    #[error("store: {0}")]
    Store(String),
    /// A store write whose answer did not come (it timed out, or its connection broke while
    /// it was out): the database may have applied it or not. The embedded journal keeps
    /// such a write's changes and writes it again until the database answers
    /// (`src/engine/journal.rs`).
    #[error("store, outcome unknown: {0}")]
    StoreInDoubt(String),
    /// Embedded engine: the answer would repeat a change of this order (its id) that is
    /// not durable yet. The engine waits for its commit and decides again; this reaches
    /// the caller only as the 503 of a commit that did not answer in time.
    #[error("order {0}: its last change is still being written")]
    Settling(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn side(&self) -> Side {
        match self {
            Error::RedisTimeout
            | Error::RedisConnection(_)
            | Error::RedisRefused { .. }
            | Error::ScriptReply(_)
            | Error::CircuitOpen
            | Error::Shed
            | Error::NotReplicated { .. }
            | Error::InTransit
            | Error::Fenced(_) => Side::Redis,
            Error::Store(_) | Error::StoreInDoubt(_) | Error::Settling(_) => Side::Store,
            Error::Internal(_) => Side::Internal,
        }
    }

    /// The `kind` label of `seckill_redis_errors_total`.
    pub fn redis_kind(&self) -> Option<&'static str> {
        match self {
            Error::RedisTimeout => Some("timeout"),
            Error::RedisConnection(_) => Some("connection"),
            // An error reply and a reply we could not decode both come from the command
            // itself, not the connection: one `script` series, as the dashboard reads it.
            Error::RedisRefused { .. } | Error::ScriptReply(_) => Some("script"),
            Error::CircuitOpen => Some("circuit_open"),
            Error::Shed => Some("shed"),
            Error::NotReplicated { .. } => Some("not_replicated"),
            Error::Fenced(_) => Some("fenced"),
            Error::InTransit => Some("in_transit"),
            _ => None,
        }
    }

    /// How a failure is told to the shopper: unavailable (retry) or internal.
    pub fn to_reject(&self) -> Reject {
        match self {
            Error::RedisTimeout | Error::RedisConnection(_) => Reject::Unavailable {
                retry_after_s: 1,
                reason: "stock engine unreachable",
            },
            Error::CircuitOpen => Reject::Unavailable {
                retry_after_s: 2,
                reason: "circuit open",
            },
            Error::Shed => Reject::Unavailable {
                retry_after_s: 1,
                reason: "shedding load",
            },
            Error::NotReplicated { .. } => Reject::Unavailable {
                retry_after_s: 1,
                reason: "stock engine replicas behind",
            },
            Error::Store(_) | Error::StoreInDoubt(_) | Error::Settling(_) => Reject::Unavailable {
                retry_after_s: 1,
                reason: "order store unreachable",
            },
            Error::InTransit => Reject::Unavailable {
                retry_after_s: 1,
                reason: "stock moving between buckets",
            },
            Error::Fenced(_) => Reject::Unavailable {
                retry_after_s: 2,
                reason: "stock being rebuilt: Redis lost writes",
            },
            Error::RedisRefused { code, .. } if Self::is_transient(code) => Reject::Unavailable {
                retry_after_s: 1,
                reason: "stock engine busy",
            },
            Error::RedisRefused { .. } | Error::ScriptReply(_) | Error::Internal(_) => Reject::Internal,
        }
    }

    /// A call that failed this way may have run on Redis all the same (the reply was lost):
    /// only sending it again tells.
    pub fn may_have_run(&self) -> bool {
        matches!(self, Error::RedisTimeout | Error::RedisConnection(_))
    }

    /// A call refused by the gateway itself before anything was sent (the circuit breaker,
    /// the in-flight cap).
    pub fn not_sent(&self) -> bool {
        matches!(self, Error::CircuitOpen | Error::Shed)
    }

    /// Error replies a Redis gives while it cannot serve for a while (loading its data, a
    /// replica not yet promoted, a cluster reconfiguring — a redirect the cluster client
    /// did not follow in time — out of memory, a busy script).
    fn is_transient(code: &str) -> bool {
        matches!(
            code,
            "LOADING"
                | "READONLY"
                | "MASTERDOWN"
                | "CLUSTERDOWN"
                | "TRYAGAIN"
                | "MOVED"
                | "ASK"
                | "OOM"
                | "BUSY"
                | "NOREPLICAS"
        )
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        if e.is_timeout() {
            Error::RedisTimeout
        } else if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            Error::RedisConnection(e.to_string())
        } else if e.code() == Some("FENCED") {
            Error::Fenced(e.detail().unwrap_or_default().to_owned())
        } else {
            Error::RedisRefused {
                code: e.code().unwrap_or("ERR").to_owned(),
                detail: e.to_string(),
            }
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_code_has_its_status() {
        let cases = [
            (Reject::BadRequest(String::new()), 400, "bad_request"),
            (Reject::Unauthenticated(""), 401, "unauthenticated"),
            (Reject::Forbidden(""), 403, "forbidden"),
            (Reject::UnknownItem, 404, "unknown_item"),
            (Reject::UnknownOrder, 404, "unknown_order"),
            (Reject::LimitReached { held: 1, limit: 1 }, 409, "limit_reached"),
            (Reject::OrderClosed { status: "expired" }, 409, "order_closed"),
            (Reject::SoldOut, 410, "sold_out"),
            (Reject::NotStarted { starts_at_ms: 0 }, 425, "not_started"),
            (Reject::Ended, 410, "ended"),
            (Reject::PayloadTooLarge, 413, "payload_too_large"),
            (Reject::RateLimited { retry_after_s: 1 }, 429, "rate_limited"),
            (
                Reject::Unavailable {
                    retry_after_s: 1,
                    reason: "",
                },
                503,
                "unavailable",
            ),
            (Reject::Paused, 503, "paused"),
        ];
        for (r, status, code) in cases {
            assert_eq!(r.status().as_u16(), status, "{code}");
            assert_eq!(r.code(), code);
        }
        assert!(Reject::RateLimited { retry_after_s: 3 }.retry_after() == Some(3));
        assert!(Reject::SoldOut.retry_after().is_none());
        assert_eq!(Reject::Paused.retry_after(), Some(PAUSED_RETRY_AFTER_S));
    }
}
