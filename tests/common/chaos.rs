//! Seeded randomness for tests that act at random moments: the seed comes from an environment
//! variable when set (to replay a run) or the clock, and is printed.

use std::sync::{Arc, Mutex};

/// A small xorshift generator, shareable between tasks.
#[derive(Clone)]
pub struct Random(Arc<Mutex<u64>>);

impl Random {
    /// Seeded from `$variable` if set, else from the clock; prints the seed as
    /// `variable=seed` so that a failing run can be replayed.
    pub fn from_env(variable: &str) -> Random {
        let seed = std::env::var(variable)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("seed: {variable}={seed}");
        Random(Arc::new(Mutex::new(seed)))
    }

    /// A number in `0..n`.
    pub fn below(&self, n: u64) -> u64 {
        let mut seed = self.0.lock().unwrap();
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed % n
    }
}
