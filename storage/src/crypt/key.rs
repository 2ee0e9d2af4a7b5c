//! The data key, and the nonces used under it.

use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::KeyInit;
use rand::RngCore;
use zeroize::Zeroize;

use super::NONCE_LEN;

/// The 256-bit key a store file is encrypted with. Wiped from memory when dropped; its
/// `Debug` shows nothing of it.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A new random key, from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key with these bytes (the caller wipes its own copy).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes, to store it (wrapped) somewhere safe.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(super) fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Nonces for one open: a random 96-bit start, counted up.
pub(super) struct NonceSource {
    start: u128,
    next: AtomicU64,
}

impl NonceSource {
    pub(super) fn new() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes[..NONCE_LEN]);
        Self {
            start: u128::from_le_bytes(bytes),
            next: AtomicU64::new(0),
        }
    }

    pub(super) fn next(&self) -> [u8; NONCE_LEN] {
        let n = self
            .start
            .wrapping_add(u128::from(self.next.fetch_add(1, Ordering::Relaxed)));
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&n.to_le_bytes()[..NONCE_LEN]);
        nonce
    }
}
