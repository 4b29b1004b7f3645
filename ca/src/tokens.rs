//! Access tokens shared by the clients of one [`Transport`](crate::tls::Transport).
//!
//! The agent builds one client per run, so its cache lives for one run. The gateway builds a
//! client per request and keeps one transport per label: without a shared cache every
//! concurrent request would fetch its own token, and EnOS refuses two token requests signed
//! with the same millisecond timestamp (code 1001, protocols.md §1.2). One lock per key makes
//! concurrent clients wait for the one fetch instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use zeroize::Zeroizing;

/// A bearer token and the time (seconds on the transport's clock) it stops being valid.
pub struct Token {
    pub value: Zeroizing<String>,
    pub expires_at: u64,
}

/// One token per key (e.g. EnOS: API gateway URL and appKey).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<Mutex<Option<Token>>>>>,
}

/// The slot of one key, locked: a client holds it while it checks, fetches and stores the token.
pub struct TokenSlot {
    slot: Arc<Mutex<Option<Token>>>,
}

impl TokenSlot {
    pub fn lock(&self) -> MutexGuard<'_, Option<Token>> {
        // A client that panicked mid-fetch leaves at worst no token or an old one: both are safe
        // to use (an old one is refreshed), so a poisoned lock is taken over.
        self.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl TokenCache {
    pub fn slot(&self, key: &str) -> TokenSlot {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        TokenSlot { slot: slots.entry(key.to_string()).or_default().clone() }
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCache { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_one_key_share_its_token_and_other_keys_do_not() {
        let cache = TokenCache::default();
        *cache.slot("a").lock() = Some(Token { value: Zeroizing::new("t1".into()), expires_at: 9 });
        let seen = cache.slot("a").lock().as_ref().map(|t| (t.value.to_string(), t.expires_at));
        assert_eq!(seen, Some(("t1".to_string(), 9)));
        assert!(cache.slot("b").lock().is_none());
    }
}
