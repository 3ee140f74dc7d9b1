//! Stage 2 — governor token buckets: one for the whole instance, one per user, one per
//! client IP. Refusals carry a `Retry-After` in whole seconds.
//!
//! Keyed limiters keep every key they have seen until `retain_recent` drops the ones whose
//! bucket is full again (governor #171). [`Limiter::prune`] runs that every few seconds, so
//! a million distinct user ids cost memory only while they are actually being limited.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::Reject;

/// The keyed buckets' hash: foldhash's quality variant with a random seed per process (the
/// keys are client-chosen user ids), cheaper than SipHash on every request.
type Hasher = foldhash::quality::RandomState;
type Keyed<K> = RateLimiter<K, DashMapStateStore<K, Hasher>, DefaultClock>;

pub struct Limiter {
    global: Option<DefaultDirectRateLimiter>,
    per_user: Option<Keyed<String>>,
    per_ip: Option<Keyed<IpAddr>>,
    clock: DefaultClock,
}

/// Burst = rate: a shopper may spend one second's allowance at once.
fn quota(per_second: u32) -> Option<Quota> {
    NonZeroU32::new(per_second).map(Quota::per_second)
}

impl Limiter {
    /// Zero turns a bucket off.
    pub fn new(global: u32, per_user: u32, per_ip: u32) -> Self {
        Limiter {
            global: quota(global).map(RateLimiter::direct),
            per_user: quota(per_user).map(|q| RateLimiter::dashmap_with_hasher(q, Hasher::default())),
            per_ip: quota(per_ip).map(|q| RateLimiter::dashmap_with_hasher(q, Hasher::default())),
            clock: DefaultClock::default(),
        }
    }

    fn refuse(&self, not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> Reject {
        let wait = not_until.wait_time_from(self.clock.now());
        Reject::RateLimited {
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        }
    }

    /// IP and instance buckets: checked before anything else is read from the request. The
    /// IP bucket first, so a client over its own limit does not spend the instance's budget.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Reject> {
        if let Some(l) = &self.per_ip {
            l.check_key(&ip).map_err(|n| self.refuse(n))?;
        }
        if let Some(l) = &self.global {
            l.check().map_err(|n| self.refuse(n))?;
        }
        Ok(())
    }

    /// The user's bucket, once identity is known. (`&String` because the keyed limiter's
    /// key type is `String`: no allocation per check.)
    #[allow(clippy::ptr_arg)]
    pub fn check_user(&self, user: &String) -> Result<(), Reject> {
        if let Some(l) = &self.per_user {
            l.check_key(user).map_err(|n| self.refuse(n))?;
        }
        Ok(())
    }

    /// Forget keys whose buckets are full again, and give the memory back.
    pub fn prune(&self) {
        if let Some(l) = &self.per_user {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently remembered (users, IPs).
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_user.as_ref().map_or(0, |l| l.len()),
            self.per_ip.as_ref().map_or(0, |l| l.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_bucket_refuses_with_retry_after() {
        let l = Limiter::new(0, 2, 0);
        assert!(l.check_user(&"a".to_owned()).is_ok());
        assert!(l.check_user(&"a".to_owned()).is_ok());
        let r = l.check_user(&"a".to_owned()).unwrap_err();
        assert_eq!(r, Reject::RateLimited { retry_after_s: 1 });
        assert!(l.check_user(&"b".to_owned()).is_ok(), "users have their own buckets");
    }

    #[test]
    fn global_and_ip_buckets() {
        let l = Limiter::new(3, 0, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_err(), "ip bucket empty");
        assert!(l.check_ip(b).is_ok());
        assert!(
            l.check_ip(b).is_err(),
            "global bucket of 3 spent (the refused call took none)"
        );
    }

    /// A million distinct user ids must not stay in memory once their buckets refill.
    #[test]
    fn pruning_forgets_a_million_users() {
        let l = Limiter::new(0, 1000, 0);
        for i in 0..1_000_000u32 {
            l.check_user(&format!("user-{i}")).unwrap();
        }
        assert_eq!(l.tracked_keys().0, 1_000_000);
        // At 1000/s a bucket that spent one token is full again after 1 ms.
        std::thread::sleep(std::time::Duration::from_millis(50));
        l.prune();
        assert_eq!(l.tracked_keys().0, 0);
    }
}
