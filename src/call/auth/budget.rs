//! How many failed JWT signature checks one peer may make the server do.
//!
//! A signature check is the one costly step of refusing a JWT (RS256 about 5x, EdDSA 8x, ES256
//! 10x the server CPU of refusing a garbage token: BENCHMARKS.md), and `iss` and `kid` are public,
//! so anyone can send tokens that get that far. The caches do not help against a flood of
//! *distinct* forged tokens; this budget does: each peer address (IPv4 address, IPv6 /64, Unix
//! socket user) may fail `burst` checks at once and `rate` per second after that. Once it is
//! spent, a JWT from that address that is not cached as verified is refused without being parsed
//! or checked. A check that succeeds is given back, so valid tokens never spend the budget, and
//! every other address keeps its own: a valid token seen for the first time from elsewhere is
//! verified during the flood.
//!
//! Why per peer and not a server-wide cap on concurrent checks: a cap shared by everyone is what
//! a flood spends, so it would refuse the valid first-seen tokens of every other caller for as
//! long as the flood lasts; a budget per peer makes the flooding address pay. Its limit: an
//! attacker with many addresses gets a budget for each. The table of peers is bounded (see
//! [`JWT_PEERS_TRACKED`]): beyond it, newcomers share one overflow budget, so the total number of
//! checks stays bounded whatever the number of addresses, at the price of those newcomers'
//! first-seen tokens while the table is full of addresses that failed recently.

use std::{
    collections::HashMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{ops::memory::JWT_PEERS_TRACKED, transport::listener::PeerPrefix};

/// Each peer's budget as GCRA keeps it: the theoretical arrival time of its next check, which
/// runs ahead of now by one interval per recent failure. A peer whose time is past is as good as
/// absent, and is dropped when room is needed.
#[derive(Debug)]
struct Peers {
    next: HashMap<PeerPrefix, Instant>,
    /// The budget of every peer the table has no room for.
    overflow: Option<Instant>,
    /// When the table was last swept of peers whose budget is full again.
    swept: Instant,
}

/// The per-peer budget of failed signature checks, and the counts of checks made.
#[derive(Debug)]
pub struct SignatureBudget {
    /// Time one failure takes to refill.
    interval: Duration,
    /// How far ahead of now a peer's time may run: `burst` intervals.
    tolerance: Duration,
    peers: Mutex<Peers>,
    valid: AtomicU64,
    invalid: AtomicU64,
}

impl SignatureBudget {
    /// `rate` failures per second (above zero), `burst` at once (at least 1).
    pub fn new(rate: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate);
        Self {
            interval,
            tolerance: interval * burst,
            peers: Mutex::new(Peers {
                next: HashMap::new(),
                overflow: None,
                swept: Instant::now(),
            }),
            valid: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
        }
    }

    /// Whether `peer`'s budget is spent, and if so for how long, without taking from it: a
    /// spent peer's new JWTs are refused before they are even parsed, so they cost what garbage
    /// costs.
    pub fn spent(&self, peer: PeerPrefix) -> Option<Duration> {
        let now = Instant::now();
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let next = match peers.next.get(&peer) {
            Some(next) => *next,
            None if peers.next.len() < JWT_PEERS_TRACKED => return None,
            None => peers.overflow?,
        };
        let ahead = next.max(now) + self.interval - now;
        (ahead > self.tolerance).then(|| ahead - self.tolerance)
    }

    /// Takes one check from `peer`'s budget before a signature is checked; when it is spent,
    /// how long until one is back.
    pub fn take(&self, peer: PeerPrefix) -> Result<(), Duration> {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peers = &mut *peers;
        if !peers.next.contains_key(&peer)
            && peers.next.len() >= JWT_PEERS_TRACKED
            && now.duration_since(peers.swept) >= Duration::from_secs(1)
        {
            // At most once a second: a sweep walks the whole table.
            peers.swept = now;
            peers.next.retain(|_, next| *next > now);
        }
        let slot = if peers.next.contains_key(&peer) || peers.next.len() < JWT_PEERS_TRACKED {
            peers.next.entry(peer).or_insert(now)
        } else {
            peers.overflow.get_or_insert(now)
        };
        let next = (*slot).max(now) + self.interval;
        let ahead = next - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        *slot = next;
        Ok(())
    }

    /// Settles a check [`Self::take`] allowed: a signature that verified gives its check back,
    /// so only failures spend the budget. Counts the check either way.
    pub fn settle(&self, peer: PeerPrefix, valid: bool) {
        if !valid {
            self.invalid.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.valid.fetch_add(1, Ordering::Relaxed);
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peers = &mut *peers;
        if let Some(slot) = peers.next.get_mut(&peer).or(peers.overflow.as_mut()) {
            *slot = slot.checked_sub(self.interval).unwrap_or(*slot);
        }
    }

    /// Signature checks made so far whose signature and claims were valid.
    pub fn valid(&self) -> u64 {
        self.valid.load(Ordering::Relaxed)
    }

    /// Signature checks made so far that refused the token.
    pub fn invalid(&self) -> u64 {
        self.invalid.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerPrefix = PeerPrefix::V4(0x7f00_0001);
    const B: PeerPrefix = PeerPrefix::V4(0x7f00_0002);

    #[test]
    fn failures_spend_a_peers_burst_and_successes_give_back() {
        // One failure back per 1000s: nothing refills during the test.
        let budget = SignatureBudget::new(0.001, 3);
        for _ in 0..3 {
            budget.take(A).unwrap();
            budget.settle(A, false);
        }
        assert_eq!(budget.spent(B), None);
        let wait = budget.spent(A).expect("spent");
        assert!(wait > Duration::from_secs(900), "{wait:?}");
        assert!(budget.take(A).is_err());
        // Another address has its own budget, and a success costs it nothing.
        for _ in 0..10 {
            budget.take(B).unwrap();
            budget.settle(B, true);
        }
        assert_eq!((budget.valid(), budget.invalid()), (10, 3));
    }

    #[test]
    fn newcomers_share_one_budget_when_the_table_is_full() {
        let budget = SignatureBudget::new(0.001, 1);
        for i in 0..JWT_PEERS_TRACKED as u32 {
            budget.take(PeerPrefix::Uid(i)).unwrap();
        }
        budget.take(A).unwrap();
        assert!(budget.spent(B).is_some(), "A spent the overflow budget");
        assert!(budget.take(B).is_err());
        assert!(budget.take(PeerPrefix::Uid(0)).is_err(), "tracked: its own");
    }
}
