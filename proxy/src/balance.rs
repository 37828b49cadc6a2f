//! Picking an endpoint: power of two choices over the least outstanding connections. Two
//! endpoints are drawn at random (among those not already tried for this connection) and
//! the one with fewer open connections through this proxy wins; with one left it is taken.
//! The counters live with the endpoint, so a new service set keeps them for endpoints that
//! stay.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

/// One endpoint and its open connections.
#[derive(Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// Called with mutual TLS.
    pub mesh: bool,
    outstanding: AtomicUsize,
}

impl Endpoint {
    pub fn new(ip: Ipv4Addr, mesh: bool) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            ip,
            mesh,
            outstanding: AtomicUsize::new(0),
        })
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a connection until the guard drops.
    pub fn hold(self: &Arc<Self>) -> Hold {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Hold(self.clone())
    }
}

/// See [`Endpoint::hold`].
#[derive(Debug)]
pub struct Hold(Arc<Endpoint>);

impl Hold {
    pub fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints for `targets`, re-using `old`'s counters for those that stay as they were.
pub fn refresh(
    old: &HashMap<Ipv4Addr, Arc<Endpoint>>,
    targets: &[crate::config::Target],
) -> Vec<Arc<Endpoint>> {
    targets
        .iter()
        .map(|t| {
            old.get(&t.ip)
                .filter(|e| e.mesh == t.mesh)
                .cloned()
                .unwrap_or_else(|| Endpoint::new(t.ip, t.mesh))
        })
        .collect()
}

/// Power of two choices among `endpoints` not in `tried`.
pub fn pick<R: Rng>(
    endpoints: &[Arc<Endpoint>],
    tried: &[Ipv4Addr],
    rng: &mut R,
) -> Option<Arc<Endpoint>> {
    let left: Vec<&Arc<Endpoint>> = endpoints
        .iter()
        .filter(|e| !tried.contains(&e.ip))
        .collect();
    match left.len() {
        0 => None,
        1 => Some(left[0].clone()),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (left[a], left[b]);
            Some(
                if b.outstanding() < a.outstanding() {
                    b
                } else {
                    a
                }
                .clone(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eps(n: u8) -> Vec<Arc<Endpoint>> {
        (1..=n)
            .map(|i| Endpoint::new(Ipv4Addr::new(10, 42, 0, i), true))
            .collect()
    }

    #[test]
    fn a_busy_endpoint_loses_every_pair_it_is_in() {
        let e = eps(2);
        let _busy: Vec<Hold> = (0..3).map(|_| e[0].hold()).collect();
        let mut rng = rand::rng();
        for _ in 0..50 {
            assert_eq!(pick(&e, &[], &mut rng).expect("pick").ip, e[1].ip);
        }
    }

    #[test]
    fn holds_count_until_dropped_and_counters_survive_a_refresh() {
        let e = eps(3);
        let h = e[1].hold();
        let old: HashMap<_, _> = e.iter().map(|x| (x.ip, x.clone())).collect();
        let t = |ip| crate::config::Target { ip, mesh: true };
        let new = refresh(&old, &[t(e[1].ip), t(Ipv4Addr::new(10, 42, 0, 9))]);
        assert_eq!(new[0].outstanding(), 1);
        assert_eq!(new[1].outstanding(), 0);
        drop(h);
        assert_eq!(new[0].outstanding(), 0);
    }

    proptest! {
        /// A pick is never an endpoint already tried, and is None only when all were.
        #[test]
        fn picks_only_untried_endpoints(n in 0u8..8, tried in proptest::collection::vec(1u8..10, 0..8)) {
            let e = eps(n);
            let tried: Vec<Ipv4Addr> = tried.iter().map(|i| Ipv4Addr::new(10, 42, 0, *i)).collect();
            let got = pick(&e, &tried, &mut rand::rng());
            let untried = e.iter().filter(|x| !tried.contains(&x.ip)).count();
            prop_assert_eq!(got.is_none(), untried == 0);
            if let Some(g) = got {
                prop_assert!(!tried.contains(&g.ip));
            }
        }
    }
}
