//! How often the heartbeat intake answers, and logs, a heartbeat of a layout version it
//! does not take (protocol::refusal): per source address, at most one refusal a second
//! and one warning a minute. A watchdog of another version sends every interval on every
//! path, and a refusal is unauthenticated and goes wherever the (spoofable) source
//! address says: once a second is plenty for a watchdog to log it, and it keeps the
//! controller from being a reflector (a refusal is also shorter than what it answers).
use std::collections::HashMap;
use std::net::IpAddr;

use super::limiter::MAX_SOURCES;

/// At most one refusal per source address per this many ms.
pub const REFUSAL_EVERY_MS: u64 = 1_000;
/// At most one warning per source address per this many ms.
pub const WARNING_EVERY_MS: u64 = 60_000;

/// Per source address: when it was last sent a refusal, and last warned about.
#[derive(Debug, Default)]
pub struct Refusals {
    last: HashMap<IpAddr, Last>,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    refused_ms: Option<u64>,
    warned_ms: Option<u64>,
}

/// What to do about one refused heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Send the refusal.
    pub reply: bool,
    /// Log a warning.
    pub warn: bool,
}

impl Refusals {
    /// At monotonic `now_ms`, a heartbeat of another version came from `source`: reply,
    /// warn, both or neither? The table keeps at most [`MAX_SOURCES`] addresses (those
    /// idle for [`WARNING_EVERY_MS`] are swept); a new address beyond that gets neither,
    /// so a flood from spoofed addresses neither grows memory nor draws refusals.
    pub fn answer(&mut self, source: IpAddr, now_ms: u64) -> Answer {
        if !self.last.contains_key(&source) && self.last.len() >= MAX_SOURCES {
            self.last.retain(|_, l| {
                [l.refused_ms, l.warned_ms]
                    .into_iter()
                    .flatten()
                    .any(|t| now_ms.saturating_sub(t) < WARNING_EVERY_MS)
            });
            if self.last.len() >= MAX_SOURCES {
                return Answer {
                    reply: false,
                    warn: false,
                };
            }
        }
        let last = self.last.entry(source).or_insert(Last {
            refused_ms: None,
            warned_ms: None,
        });
        let due = |slot: &mut Option<u64>, every: u64| {
            let due = slot.is_none_or(|t| now_ms.saturating_sub(t) >= every);
            if due {
                *slot = Some(now_ms);
            }
            due
        };
        Answer {
            reply: due(&mut last.refused_ms, REFUSAL_EVERY_MS),
            warn: due(&mut last.warned_ms, WARNING_EVERY_MS),
        }
    }

    /// Source addresses tracked.
    pub fn sources(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_source_gets_one_refusal_a_second_and_one_warning_a_minute() {
        let mut r = Refusals::default();
        let both = Answer {
            reply: true,
            warn: true,
        };
        assert_eq!(r.answer(ip(1), 0), both);
        let replies: Vec<u64> = (1..=120_000u64)
            .step_by(100)
            .filter(|&t| r.answer(ip(1), t).reply)
            .collect();
        // Offered every 100 ms: answered at 1.001 s, 2.001 s, … 119.001 s.
        assert_eq!(replies.len(), 119, "one a second");
        assert_eq!((replies[0], replies[118]), (1_001, 119_001));
        let mut r = Refusals::default();
        let warnings = (0..=120_000u64)
            .step_by(100)
            .filter(|&t| r.answer(ip(1), t).warn)
            .count();
        assert_eq!(warnings, 3, "at 0, 60 and 120 s");
        assert_eq!(r.answer(ip(2), 120_000), both, "another address");
    }

    #[test]
    fn a_flood_from_many_addresses_cannot_grow_the_table_or_draw_refusals_past_its_cap() {
        let mut r = Refusals::default();
        let mut replied = 0;
        for i in 0..(MAX_SOURCES as u32 + 100) {
            replied += usize::from(r.answer(IpAddr::from(i.to_be_bytes()), 0).reply);
        }
        assert_eq!(r.sources(), MAX_SOURCES);
        assert_eq!(replied, MAX_SOURCES);
        // Once they are a minute old, they are swept to make room.
        assert!(r.answer(ip(1), WARNING_EVERY_MS).reply);
        assert_eq!(r.sources(), 1);
    }
}
