//! Open connections per client address, for the servers anyone in the cluster can reach:
//! connections are accepted before any credential is seen, so without a cap one pod could hold
//! every slot and every other client would wait in the accept backlog. On a gateway (its slots
//! shared by every namespace it serves) that one pod needs only to ask something cheap every
//! 19 s (HTTP/1) or 119 s (HTTP/2); on the webhook, whose only real client is the apiserver and
//! which fails closed, it would block pod creation cluster-wide.
//!
//! Pods reach a Service from their own addresses (a Service rewrites the destination, not the
//! source), so a cap per address is a cap per pod. A connection over the cap is closed at once.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// The open connections of each client address (cloning shares them).
#[derive(Clone, Debug)]
pub struct PerClient {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    cap: usize,
}

/// One connection's place in its address's count; given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl PerClient {
    pub fn new(cap: usize) -> Self {
        Self {
            open: Arc::default(),
            cap: cap.max(1),
        }
    }

    /// A place for one more connection from `client`, or `None` when it has `cap` open.
    /// IPv4 clients of a dual-stack listener count as their IPv4 address.
    pub fn admit(&self, client: IpAddr) -> Option<ClientSlot> {
        let client = client.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(client).or_default();
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            open: self.open.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_address_gets_the_cap_and_a_closed_connection_gives_its_place_back() {
        let per_client = PerClient::new(2);
        let a = [
            per_client.admit(ip("10.0.0.1")),
            per_client.admit(ip("10.0.0.1")),
        ];
        assert!(a.iter().all(Option::is_some));
        assert!(
            per_client.admit(ip("10.0.0.1")).is_none(),
            "a third from one address"
        );
        assert!(
            per_client.admit(ip("10.0.0.2")).is_some(),
            "another address has its own"
        );
        drop(a);
        assert!(per_client.admit(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_its_ipv4_address() {
        let per_client = PerClient::new(1);
        let _held = per_client.admit(ip("10.0.0.1")).unwrap();
        assert!(per_client.admit(ip("::ffff:10.0.0.1")).is_none());
    }

    #[test]
    fn addresses_without_connections_are_forgotten() {
        let per_client = PerClient::new(1);
        for i in 0..100u8 {
            drop(per_client.admit(IpAddr::from([10, 0, 1, i])).unwrap());
        }
        assert!(per_client.open.lock().unwrap().is_empty());
    }
}
