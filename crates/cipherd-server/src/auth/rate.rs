//! Per-principal rate limits (`limits.principal_rate`, `limits.principal_burst`):
//! a GCRA limiter (governor) keyed by the authenticated principal, beside the
//! edge's global limits. Only authenticated callers get a key, so the key set is
//! bounded by the principals the server knows, not by what clients send.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota};

use crate::Error;

/// The limiter of one server.
#[derive(Debug)]
pub struct PrincipalLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    per_second: u32,
}

impl PrincipalLimiter {
    /// `per_second` requests per principal with bursts of `burst`; `None` when
    /// the rate is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<std::sync::Arc<Self>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(std::sync::Arc::new(Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_second,
        }))
    }

    /// Takes one request from `principal`'s allowance, or RESOURCE_EXHAUSTED /
    /// `RATE_LIMITED`.
    pub fn check(&self, principal: &str) -> Result<(), Error> {
        let key = principal.to_owned();
        self.limiter
            .check_key(&key)
            .map_err(|_| Error::RateLimited {
                per_second: self.per_second,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_principal_has_its_own_allowance() {
        let limiter = PrincipalLimiter::new(1, 2).expect("a limit");
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        assert!(matches!(
            limiter.check("a"),
            Err(Error::RateLimited { per_second: 1 })
        ));
        assert!(limiter.check("b").is_ok());
        assert!(PrincipalLimiter::new(0, 5).is_none());
    }
}
