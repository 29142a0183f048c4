//! The gateway's admission limits, per replica: a tenant's invocations in flight
//! (`--tenant-max-concurrency`) and per second (`--tenant-rate-limit`, a token bucket with bursts
//! of twice the rate), and a function's reserved concurrency as its cap. A request over a limit
//! is refused at once with 429 and `Retry-After`, so overload of one tenant never queues work in
//! the control plane. A [`Permit`] holds the in-flight slots until the response has been sent.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use uuid::Uuid;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The tenant's requests per second.
    TenantRate,
    /// The tenant's invocations in flight.
    TenantConcurrency,
    /// The function's reserved concurrency.
    FunctionConcurrency,
}

impl Refusal {
    /// The problem code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TenantRate => "tenant_rate_limit",
            Refusal::TenantConcurrency => "tenant_concurrency_limit",
            Refusal::FunctionConcurrency => "function_concurrency_limit",
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limits of one replica.
#[derive(Clone, Default)]
pub struct Limits {
    in_flight: Arc<Mutex<HashMap<Uuid, Arc<AtomicU32>>>>,
    buckets: Arc<Mutex<HashMap<Uuid, Bucket>>>,
}

/// Slots taken by one admitted request; given back when dropped.
pub struct Permit {
    slots: Vec<Arc<AtomicU32>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        for s in &self.slots {
            s.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Limits {
    fn counter(&self, id: Uuid) -> Arc<AtomicU32> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone()
    }

    /// Takes a slot of `counter` if fewer than `max` are taken.
    fn take(counter: &Arc<AtomicU32>, max: u32) -> bool {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Admits one invocation of `function` of `tenant`, or says which limit refuses it.
    pub fn admit(
        &self,
        tenant: Uuid,
        function: Uuid,
        tenant_rate: u32,
        tenant_max: u32,
        function_max: Option<u32>,
    ) -> Result<Permit, Refusal> {
        if tenant_rate > 0 {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let burst = f64::from(tenant_rate) * 2.0;
            let now = Instant::now();
            let b = buckets.entry(tenant).or_insert(Bucket { tokens: burst, at: now });
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(tenant_rate)).min(burst);
            b.at = now;
            if b.tokens < 1.0 {
                return Err(Refusal::TenantRate);
            }
            b.tokens -= 1.0;
        }
        let tenant_slots = self.counter(tenant);
        if !Self::take(&tenant_slots, tenant_max) {
            return Err(Refusal::TenantConcurrency);
        }
        let mut permit = Permit { slots: vec![tenant_slots] };
        if let Some(max) = function_max {
            let function_slots = self.counter(function);
            if !Self::take(&function_slots, max) {
                return Err(Refusal::FunctionConcurrency);
            }
            permit.slots.push(function_slots);
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_limits_hold_and_permits_give_their_slots_back() {
        let limits = Limits::default();
        let (t, f) = (Uuid::now_v7(), Uuid::now_v7());
        let a = limits.admit(t, f, 0, 2, Some(1)).unwrap();
        assert_eq!(limits.admit(t, f, 0, 2, Some(1)).err(), Some(Refusal::FunctionConcurrency));
        let other = limits.admit(t, Uuid::now_v7(), 0, 2, None).unwrap();
        assert_eq!(limits.admit(t, Uuid::now_v7(), 0, 2, None).err(), Some(Refusal::TenantConcurrency));
        drop(a);
        drop(other);
        // A refused function slot gave its tenant slot back, so both are free again.
        let _b = limits.admit(t, f, 0, 2, Some(1)).unwrap();
        let _c = limits.admit(t, Uuid::now_v7(), 0, 2, None).unwrap();
    }

    #[test]
    fn the_rate_limit_allows_a_burst_of_twice_the_rate_then_refuses() {
        let limits = Limits::default();
        let (t, f) = (Uuid::now_v7(), Uuid::now_v7());
        let admitted = (0..100).filter(|_| limits.admit(t, f, 10, 1000, None).is_ok()).count();
        // 20 from the burst, and at most a token or two refilled while the loop ran.
        assert!((20..=22).contains(&admitted), "{admitted}");
        assert_eq!(limits.admit(t, f, 10, 1000, None).err(), Some(Refusal::TenantRate));
        // Another tenant has a bucket of its own.
        assert!(limits.admit(Uuid::now_v7(), f, 10, 1000, None).is_ok());
    }
}
