//! Compiled policy parts shared by every tenant whose spec is the same. A gateway serving
//! thousands of ClaudeKeys mostly serves a few distinct policies: compiling the redaction
//! detectors or the model globs once per distinct spec, not once per ClaudeKey, is what keeps a
//! tenant at a few KiB (issue 21: 10,000 tenants in <= 100 MiB).
//!
//! Values are held weakly: a part lives as long as some tenant uses it, and a rotation that
//! recompiles a tenant finds the part its previous version still holds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

/// Parts by the canonical text of the spec they were compiled from. Equal text means an equal
/// spec, so a tenant can only ever be handed what it would have compiled itself.
pub struct Interned<V> {
    parts: Mutex<Parts<V>>,
}

struct Parts<V> {
    by_spec: HashMap<String, Weak<V>>,
    /// Entries alive at the last sweep; the map is swept of dead entries when it doubles.
    live_at_sweep: usize,
}

impl<V> Default for Interned<V> {
    fn default() -> Self {
        Self {
            parts: Mutex::new(Parts {
                by_spec: HashMap::new(),
                live_at_sweep: 0,
            }),
        }
    }
}

impl<V> Interned<V> {
    /// The part compiled from `spec`: a live one, or `compile()`'s result, kept for the next
    /// tenant with the same spec. An error is returned and nothing is kept.
    pub fn get_or_compile<E>(
        &self,
        spec: String,
        compile: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = parts.by_spec.get(&spec).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let part = Arc::new(compile()?);
        parts.by_spec.insert(spec, Arc::downgrade(&part));
        if parts.by_spec.len() > 2 * parts.live_at_sweep.max(64) {
            parts.by_spec.retain(|_, weak| weak.strong_count() > 0);
            parts.live_at_sweep = parts.by_spec.len();
        }
        Ok(part)
    }

    /// Specs with an entry (live or not yet swept), for tests.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.parts.lock().unwrap().by_spec.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: u32) -> impl FnOnce() -> Result<u32, ()> {
        move || Ok(v)
    }

    #[test]
    fn equal_specs_share_one_part_and_different_specs_do_not() {
        let interned = Interned::default();
        let a = interned.get_or_compile("a".into(), ok(1)).unwrap();
        let again = interned
            .get_or_compile("a".into(), || -> Result<u32, ()> {
                panic!("compiled twice")
            })
            .unwrap();
        let b = interned.get_or_compile("b".into(), ok(2)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!((*a, *b), (1, 2));
    }

    #[test]
    fn a_part_no_tenant_holds_is_compiled_again() {
        let interned = Interned::default();
        drop(interned.get_or_compile("a".into(), ok(1)).unwrap());
        let mut compiled = false;
        interned
            .get_or_compile("a".into(), || {
                compiled = true;
                Ok::<_, ()>(1)
            })
            .unwrap();
        assert!(compiled);
    }

    #[test]
    fn a_failed_compile_keeps_nothing() {
        let interned: Interned<u32> = Interned::default();
        assert_eq!(
            interned.get_or_compile("a".into(), || Err("bad")),
            Err("bad")
        );
        assert_eq!(interned.entries(), 0);
    }

    #[test]
    fn dead_entries_are_swept_as_the_map_grows() {
        let interned = Interned::default();
        let kept = interned.get_or_compile("kept".into(), ok(0)).unwrap();
        for i in 0..1000 {
            drop(interned.get_or_compile(format!("gone-{i}"), ok(i)).unwrap());
        }
        assert!(interned.entries() <= 129, "{} entries", interned.entries());
        let again = interned.get_or_compile("kept".into(), ok(9)).unwrap();
        assert!(Arc::ptr_eq(&kept, &again));
    }
}
