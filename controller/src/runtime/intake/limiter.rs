//! A token bucket per source address, so one address flooding the heartbeat port cannot
//! crowd out other hosts' heartbeats: over its rate, a source's datagrams are dropped
//! (and counted) before any MAC is computed.
use std::collections::HashMap;
use std::net::IpAddr;

/// Sources kept at most; beyond, sources idle for [`IDLE_MS`] are swept, and if the table
/// is still full a new source is refused (a spoofed-address flood cannot grow memory).
pub const MAX_SOURCES: usize = 65_536;
/// A source not heard for this long is forgotten at the next sweep.
const IDLE_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths, so that rates below one per millisecond add up exactly.
    milli_tokens: u64,
    last_ms: u64,
}

/// Per source address: at most `rate_per_s` datagrams a second on average, `burst` at once.
#[derive(Debug)]
pub struct SourceLimiter {
    rate_per_s: u64,
    burst: u64,
    buckets: HashMap<IpAddr, Bucket>,
}

/// Why a datagram was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// This source is over its rate.
    OverRate,
    /// The table of sources is full (a flood from very many addresses).
    TooManySources,
}

impl SourceLimiter {
    /// `rate_per_s` 0 turns limiting off.
    pub fn new(rate_per_s: u64, burst: u64) -> Self {
        SourceLimiter {
            rate_per_s,
            burst: burst.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for a datagram from `source` at monotonic `now_ms`.
    pub fn allow(&mut self, source: IpAddr, now_ms: u64) -> Result<(), Limited> {
        if self.rate_per_s == 0 {
            return Ok(());
        }
        let full = self.burst * 1000;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.buckets
                .retain(|_, b| now_ms.saturating_sub(b.last_ms) < IDLE_MS);
            if self.buckets.len() >= MAX_SOURCES {
                return Err(Limited::TooManySources);
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            milli_tokens: full,
            last_ms: now_ms,
        });
        // rate per s = rate milli-tokens per ms.
        let refill = now_ms
            .saturating_sub(b.last_ms)
            .saturating_mul(self.rate_per_s);
        b.milli_tokens = b.milli_tokens.saturating_add(refill).min(full);
        b.last_ms = b.last_ms.max(now_ms);
        if b.milli_tokens < 1000 {
            return Err(Limited::OverRate);
        }
        b.milli_tokens -= 1000;
        Ok(())
    }

    /// Sources currently tracked.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_another_source_is_not_touched() {
        let mut l = SourceLimiter::new(100, 10);
        let passed = (0..50).filter(|_| l.allow(ip(1), 0).is_ok()).count();
        assert_eq!(
            passed, 10,
            "the burst, then nothing within the same millisecond"
        );
        assert_eq!(l.allow(ip(1), 0), Err(Limited::OverRate));
        assert!(
            l.allow(ip(2), 0).is_ok(),
            "another address has its own bucket"
        );
        // 100/s: one token every 10 ms.
        assert!(l.allow(ip(1), 10).is_ok());
        assert_eq!(l.allow(ip(1), 10), Err(Limited::OverRate));
        // A second later at most the burst is available again.
        let passed = (0..50).filter(|_| l.allow(ip(1), 1_010).is_ok()).count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn rate_zero_lets_everything_through() {
        let mut l = SourceLimiter::new(0, 1);
        assert!((0..10_000).all(|_| l.allow(ip(1), 0).is_ok()));
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn a_flood_from_many_addresses_cannot_grow_the_table_past_its_cap() {
        let mut l = SourceLimiter::new(10, 10);
        let mut refused = 0;
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let a = IpAddr::from(i.to_be_bytes());
            if l.allow(a, 0) == Err(Limited::TooManySources) {
                refused += 1;
            }
        }
        assert_eq!(l.sources(), MAX_SOURCES);
        assert_eq!(refused, 100);
        // Once they go idle they are swept to make room.
        assert!(l.allow(ip(1), IDLE_MS + 1).is_ok());
        assert_eq!(l.sources(), 1);
    }
}
