//! Stage 2 — governor token buckets: one for the whole instance, one per user, one per
//! client IP. Refusals carry a `Retry-After` in whole seconds.
//!
//! A user's bucket is keyed by a 64-bit hash of the user id (random seed per process), not
//! by the id: no copy of the id per new user, and a lookup compares two integers instead of
//! following a pointer to a string (with a new user on most requests, the map's string
//! compares were a third of the limiter's time on the sold-out path). Two ids with one hash
//! would share a bucket; among ten million ids in memory at once the chance that any two do
//! is about 3 in a million, and then each is held to their joint rate, nothing worse.
//!
//! Keyed limiters keep every key they have seen until `retain_recent` drops the ones whose
//! bucket is full again (governor #171). [`Limiter::prune`] runs that every few seconds, so
//! a million distinct user ids cost memory only while they are actually being limited.
//!
//! ## Live limits
//!
//! The rates change at run time without a restart, from three sources ([`Limiter::configure`],
//! [`Limiter::share`], [`Limiter::instances`]):
//! - configured: flags, environment and the `--config` file, reloaded on SIGHUP;
//! - shared: `PUT /admin/v1/limits`, kept by the engine (with Redis: the hash `sk:limits`,
//!   pushed to every instance); a shared value wins over the configured one until it is
//!   cleared (`null`);
//! - the live instance count (with Redis: the heartbeats in `sk:instances`): the global rate
//!   is the deployment's, and each instance enforces `ceil(rate_global / instances)` of it.
//!
//! Each bucket sits behind an [`ArcSwapOption`]: a check is one atomic load, no lock; a
//! change builds a new bucket and swaps it in. A replaced bucket starts full (its keys'
//! history is dropped): a change may let one extra burst through, never refuse more.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use crate::error::Reject;
use crate::metrics;

/// The keyed buckets' hash: foldhash's quality variant with a random seed per process (the
/// keys are client-chosen user ids), cheaper than SipHash on every request.
type Hasher = foldhash::quality::RandomState;
type Keyed<K> = RateLimiter<K, DashMapStateStore<K, Hasher>, DefaultClock>;

/// The three rates, in requests per second (0: that bucket is off). `global` is the
/// deployment's: with several instances each takes its share ([`InForce::global_share`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub global: u32,
    pub per_user: u32,
    pub per_ip: u32,
}

/// A change of the shared limits, per rate: `None` leaves it as it is, `Some(None)` clears
/// it (the configured value applies again), `Some(Some(n))` sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitsChange {
    pub global: Option<Option<u32>>,
    pub per_user: Option<Option<u32>>,
    pub per_ip: Option<Option<u32>>,
}

impl LimitsChange {
    /// The change that makes the shared limits exactly `shared` (what a read of the shared
    /// store says: a rate it does not hold is cleared).
    pub fn exactly(shared: SharedLimits) -> Self {
        LimitsChange {
            global: Some(shared.global),
            per_user: Some(shared.per_user),
            per_ip: Some(shared.per_ip),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.global.is_none() && self.per_user.is_none() && self.per_ip.is_none()
    }

    fn apply_to(&self, shared: &mut SharedLimits) {
        for (change, value) in [
            (self.global, &mut shared.global),
            (self.per_user, &mut shared.per_user),
            (self.per_ip, &mut shared.per_ip),
        ] {
            if let Some(v) = change {
                *value = v;
            }
        }
    }
}

/// The rates set by `PUT /admin/v1/limits` (`None`: not set, the configured one applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedLimits {
    pub global: Option<u32>,
    pub per_user: Option<u32>,
    pub per_ip: Option<u32>,
}

/// What the limiter enforces now: the admin route's answer, the gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct InForce {
    /// The deployment's global rate (0: off).
    pub rate_global: u32,
    pub rate_per_user: u32,
    pub rate_per_ip: u32,
    /// Live instances sharing `rate_global` (1 without Redis).
    pub instances: u32,
    /// This instance's own global bucket: `ceil(rate_global / instances)`.
    pub rate_global_share: u32,
}

impl InForce {
    fn of(configured: Limits, shared: SharedLimits, instances: u32) -> Self {
        let rate_global = shared.global.unwrap_or(configured.global);
        let instances = instances.max(1);
        InForce {
            rate_global,
            rate_per_user: shared.per_user.unwrap_or(configured.per_user),
            rate_per_ip: shared.per_ip.unwrap_or(configured.per_ip),
            instances,
            rate_global_share: rate_global.div_ceil(instances),
        }
    }
}

/// Where the rates come from, and what they make now.
struct Sources {
    configured: Limits,
    shared: SharedLimits,
    instances: u32,
    in_force: InForce,
}

pub struct Limiter {
    global: ArcSwapOption<DefaultDirectRateLimiter>,
    per_user: ArcSwapOption<Keyed<u64>>,
    /// The user buckets' key: `user_key.hash_one(user_id)`.
    user_key: Hasher,
    per_ip: ArcSwapOption<Keyed<IpAddr>>,
    /// A std Mutex: taken only by the changes (a reload, an admin PUT, a heartbeat that
    /// counted another number of instances), never by a check, and never held across an
    /// await. It makes a change's read-compute-swap one step, so two changes at once cannot
    /// leave a bucket of the older one in force.
    sources: Mutex<Sources>,
    clock: DefaultClock,
}

/// Burst = rate: a shopper may spend one second's allowance at once.
fn quota(per_second: u32) -> Option<Quota> {
    NonZeroU32::new(per_second).map(Quota::per_second)
}

fn direct(per_second: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    quota(per_second).map(|q| Arc::new(RateLimiter::direct(q)))
}

fn keyed<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<Arc<Keyed<K>>> {
    quota(per_second).map(|q| Arc::new(RateLimiter::dashmap_with_hasher(q, Hasher::default())))
}

impl Limiter {
    /// The configured rates, one instance, nothing shared yet. Zero turns a bucket off.
    pub fn new(configured: Limits) -> Self {
        let in_force = InForce::of(configured, SharedLimits::default(), 1);
        metrics::rate_limits(&in_force);
        Limiter {
            global: ArcSwapOption::new(direct(in_force.rate_global_share)),
            per_user: ArcSwapOption::new(keyed(in_force.rate_per_user)),
            per_ip: ArcSwapOption::new(keyed(in_force.rate_per_ip)),
            user_key: Hasher::default(),
            sources: Mutex::new(Sources {
                configured,
                shared: SharedLimits::default(),
                instances: 1,
                in_force,
            }),
            clock: DefaultClock::default(),
        }
    }

    /// New configured rates (a SIGHUP reload); a shared rate still wins over its configured one.
    pub fn configure(&self, configured: Limits) -> InForce {
        self.change(|s| s.configured = configured)
    }

    /// A change of the shared rates (`PUT /admin/v1/limits`, here or on another instance).
    pub fn share(&self, change: LimitsChange) -> InForce {
        self.change(|s| change.apply_to(&mut s.shared))
    }

    /// The number of live instances sharing the global rate (at least 1).
    pub fn instances(&self, n: u32) -> InForce {
        self.change(|s| s.instances = n.max(1))
    }

    /// The rates in force now.
    pub fn in_force(&self) -> InForce {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).in_force
    }

    /// Apply `f` to the sources and swap in a new bucket for each rate that changed.
    fn change(&self, f: impl FnOnce(&mut Sources)) -> InForce {
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        let was = s.in_force;
        let now = InForce::of(s.configured, s.shared, s.instances);
        if now == was {
            return now;
        }
        if now.rate_global_share != was.rate_global_share {
            self.global.store(direct(now.rate_global_share));
        }
        if now.rate_per_user != was.rate_per_user {
            self.per_user.store(keyed(now.rate_per_user));
        }
        if now.rate_per_ip != was.rate_per_ip {
            self.per_ip.store(keyed(now.rate_per_ip));
        }
        s.in_force = now;
        metrics::rate_limits(&now);
        tracing::info!(
            rate_global = now.rate_global,
            rate_per_user = now.rate_per_user,
            rate_per_ip = now.rate_per_ip,
            instances = now.instances,
            rate_global_share = now.rate_global_share,
            "rate limits in force"
        );
        now
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
        if let Some(l) = &*self.per_ip.load() {
            l.check_key(&ip).map_err(|n| self.refuse(n))?;
        }
        if let Some(l) = &*self.global.load() {
            l.check().map_err(|n| self.refuse(n))?;
        }
        Ok(())
    }

    /// The user's bucket, once identity is known.
    pub fn check_user(&self, user: &str) -> Result<(), Reject> {
        if let Some(l) = &*self.per_user.load() {
            l.check_key(&self.user_key.hash_one(user)).map_err(|n| self.refuse(n))?;
        }
        Ok(())
    }

    /// Forget keys whose buckets are full again, and give the memory back.
    pub fn prune(&self) {
        if let Some(l) = &*self.per_user.load() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &*self.per_ip.load() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys currently remembered (users, IPs).
    pub fn tracked_keys(&self) -> (usize, usize) {
        (
            self.per_user.load().as_ref().map_or(0, |l| l.len()),
            self.per_ip.load().as_ref().map_or(0, |l| l.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: u32, per_user: u32, per_ip: u32) -> Limits {
        Limits {
            global,
            per_user,
            per_ip,
        }
    }

    #[test]
    fn per_user_bucket_refuses_with_retry_after() {
        let l = Limiter::new(limits(0, 2, 0));
        assert!(l.check_user("a").is_ok());
        assert!(l.check_user("a").is_ok());
        let r = l.check_user("a").unwrap_err();
        assert_eq!(r, Reject::RateLimited { retry_after_s: 1 });
        assert!(l.check_user("b").is_ok(), "users have their own buckets");
    }

    #[test]
    fn global_and_ip_buckets() {
        let l = Limiter::new(limits(3, 0, 2));
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
        let l = Limiter::new(limits(0, 1000, 0));
        for i in 0..1_000_000u32 {
            l.check_user(&format!("user-{i}")).unwrap();
        }
        assert_eq!(l.tracked_keys().0, 1_000_000);
        // At 1000/s a bucket that spent one token is full again after 1 ms.
        std::thread::sleep(std::time::Duration::from_millis(50));
        l.prune();
        assert_eq!(l.tracked_keys().0, 0);
    }

    /// Spend a user's bucket: how many checks pass out of `n` in a row.
    fn passes(l: &Limiter, user: &str, n: usize) -> usize {
        let user = user.to_owned();
        (0..n).filter(|_| l.check_user(&user).is_ok()).count()
    }

    #[test]
    fn a_reload_swaps_the_bucket_at_once() {
        let l = Limiter::new(limits(0, 100, 0));
        assert_eq!(passes(&l, "a", 5), 5);
        let now = l.configure(limits(0, 2, 0));
        assert_eq!(now.rate_per_user, 2);
        // The new bucket starts full: the new rate's burst, whatever "a" spent before.
        assert_eq!(passes(&l, "a", 10), 2);
        assert_eq!(passes(&l, "b", 10), 2);
        // The same rates again change nothing: the spent bucket stays spent.
        l.configure(limits(0, 2, 0));
        assert_eq!(passes(&l, "a", 10), 0);
        // Zero turns it off.
        l.configure(limits(0, 0, 0));
        assert_eq!(passes(&l, "a", 50), 50);
    }

    #[test]
    fn a_shared_rate_wins_until_cleared() {
        let l = Limiter::new(limits(0, 3, 0));
        let now = l.share(LimitsChange {
            per_user: Some(Some(1)),
            ..LimitsChange::default()
        });
        assert_eq!((now.rate_per_user, now.rate_per_ip), (1, 0));
        assert_eq!(passes(&l, "a", 5), 1);
        // A reload changes the configured rate; the shared one still wins.
        assert_eq!(l.configure(limits(0, 7, 0)).rate_per_user, 1);
        // Cleared: the configured rate (the reloaded one) applies again.
        let now = l.share(LimitsChange {
            per_user: Some(None),
            ..LimitsChange::default()
        });
        assert_eq!(now.rate_per_user, 7);
        assert_eq!(passes(&l, "a", 10), 7);
        // A read of the shared store replaces every rate: absent means cleared.
        let now = l.share(LimitsChange::exactly(SharedLimits {
            global: Some(9),
            ..SharedLimits::default()
        }));
        assert_eq!((now.rate_global, now.rate_per_user), (9, 7));
    }

    #[test]
    fn the_global_rate_is_shared_by_the_live_instances() {
        let l = Limiter::new(limits(10, 0, 0));
        assert_eq!(l.in_force().rate_global_share, 10);
        let now = l.instances(3);
        assert_eq!((now.rate_global, now.instances, now.rate_global_share), (10, 3, 4));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!((0..20).filter(|_| l.check_ip(ip).is_ok()).count(), 4);
        // Never below one request a second, never off by sharing; zero instances is one.
        assert_eq!(l.instances(50).rate_global_share, 1);
        assert_eq!(l.instances(0).rate_global_share, 10);
    }

    /// Checks on several threads while the rates change under them: no check blocks, none
    /// panics, and the last change is the one in force.
    #[test]
    fn checks_run_while_the_rates_change() {
        let l = Arc::new(Limiter::new(limits(1000, 1000, 1000)));
        let checkers: Vec<_> = (0..2)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let user = format!("user-{t}");
                    let ip: IpAddr = "10.0.0.1".parse().unwrap();
                    for _ in 0..50_000 {
                        let _ = l.check_ip(ip);
                        let _ = l.check_user(&user);
                    }
                })
            })
            .collect();
        let mut changes = 0u32;
        while !checkers.iter().all(|c| c.is_finished()) {
            changes += 1;
            let rate = 1 + changes % 500;
            l.configure(limits(rate, rate, rate));
        }
        for c in checkers {
            c.join().unwrap();
        }
        assert!(changes > 0);
        l.configure(limits(7, 8, 9));
        let now = l.in_force();
        assert_eq!((now.rate_global, now.rate_per_user, now.rate_per_ip), (7, 8, 9));
    }
}
