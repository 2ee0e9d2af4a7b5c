//! Who belongs to a mesh, and how a peer proves it.
//!
//! First step: a mesh is a 32-byte secret shared by invite. Its **fingerprint** (a hash
//! of the secret) is public: nodes advertise it so that they dial only nodes of their own
//! mesh. Holding the secret is proven in the sync handshake by challenge-response: each
//! side sends a random nonce in its `Hello`; each answers with
//! `HMAC-SHA256(secret, label, prover peer id, verifier peer id, verifier nonce, prover
//! nonce)`. The secret never crosses the wire, a proof is useless on another connection
//! (fresh nonces) and cannot be relayed between other peers (both peer ids, which the
//! transport authenticates, are bound in).
//!
//! The handshake speaks of a [`Credential`] and a [`crate::wire::Proof`], so a signed
//! device certificate (roles, clinics, expiry, revocation) can later be a second kind of
//! each without changing the rest of the session.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Text that starts every invite, with the invite format version.
pub const INVITE_PREFIX: &str = "medmesh-invite-1:";
const PROOF_LABEL: &[u8] = b"medmesh/sync/auth/1";
const FINGERPRINT_LABEL: &[u8] = b"medmesh/mesh-fingerprint/1";

/// The shared secret of a mesh.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshSecret([u8; 32]);

impl std::fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshSecret({})", self.fingerprint())
    }
}

impl MeshSecret {
    /// The secret from its bytes (made with a secure random generator by the caller).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret's bytes, for storing it.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The mesh's public fingerprint: 16 hex digits.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(FINGERPRINT_LABEL);
        hash.update(self.0);
        hex::encode(&hash.finalize()[..8])
    }

    /// An invite for another device: the secret, and addresses where this node can be
    /// reached (optional hints for when discovery cannot see it).
    pub fn invite(&self, addrs: &[String]) -> String {
        let mut text = format!("{INVITE_PREFIX}{}", hex::encode(self.0));
        for addr in addrs {
            text.push('@');
            text.push_str(addr);
        }
        text
    }

    /// Reads an invite made by [`MeshSecret::invite`].
    pub fn from_invite(invite: &str) -> Result<(Self, Vec<String>), InviteError> {
        let rest = invite
            .trim()
            .strip_prefix(INVITE_PREFIX)
            .ok_or(InviteError::NotAnInvite)?;
        let mut parts = rest.split('@');
        let secret_hex = parts.next().unwrap_or_default();
        let bytes = hex::decode(secret_hex).map_err(|_| InviteError::Damaged)?;
        let secret: [u8; 32] = bytes.try_into().map_err(|_| InviteError::Damaged)?;
        let addrs = parts.filter(|a| !a.is_empty()).map(str::to_owned).collect();
        Ok((Self(secret), addrs))
    }

    fn mac(
        &self,
        prover: &str,
        verifier: &str,
        verifier_nonce: &[u8],
        prover_nonce: &[u8],
    ) -> Hmac<Sha256> {
        // HMAC pads a key shorter than the hash's block with zeros; doing it here makes
        // the key a full block, which `KeyInit::new` takes without a failure case.
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&self.0);
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&key.into());
        for part in [
            PROOF_LABEL,
            prover.as_bytes(),
            verifier.as_bytes(),
            verifier_nonce,
            prover_nonce,
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The proof that `prover` holds the secret, for `verifier`'s challenge.
    pub fn prove(
        &self,
        prover: &str,
        verifier: &str,
        verifier_nonce: &[u8],
        prover_nonce: &[u8],
    ) -> Vec<u8> {
        self.mac(prover, verifier, verifier_nonce, prover_nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks a proof (in constant time).
    pub fn verify(
        &self,
        prover: &str,
        verifier: &str,
        verifier_nonce: &[u8],
        prover_nonce: &[u8],
        proof: &[u8],
    ) -> bool {
        self.mac(prover, verifier, verifier_nonce, prover_nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

/// What a node holds to prove it belongs to its mesh.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Credential {
    /// The shared mesh secret.
    SharedSecret(MeshSecret),
}

impl Credential {
    /// The fingerprint of the mesh this credential belongs to.
    pub fn fingerprint(&self) -> String {
        match self {
            Credential::SharedSecret(secret) => secret.fingerprint(),
        }
    }
}

/// An invite that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// Not an invite at all.
    #[error(
        "this is not a medmesh invite: it should start with `{INVITE_PREFIX}`; copy the last line that `medmesh invite` printed"
    )]
    NotAnInvite,
    /// Cut or mistyped.
    #[error("this invite is damaged (cut short or mistyped); copy it again from `medmesh invite`")]
    Damaged,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_round_trip_and_bad_ones_are_named() {
        let secret = MeshSecret::from_bytes([7; 32]);
        let invite = secret.invite(&["/ip4/192.168.1.20/tcp/7401".into()]);
        let (back, addrs) = MeshSecret::from_invite(&invite).expect("invite");
        assert_eq!(back, secret);
        assert_eq!(addrs, vec!["/ip4/192.168.1.20/tcp/7401".to_owned()]);
        assert_eq!(
            MeshSecret::from_invite("hello"),
            Err(InviteError::NotAnInvite)
        );
        assert_eq!(
            MeshSecret::from_invite(&invite[..40]),
            Err(InviteError::Damaged)
        );
    }

    #[test]
    fn the_proof_is_standard_hmac_sha256_of_the_secret() {
        let secret = MeshSecret::from_bytes([5; 32]);
        let mut reference =
            <Hmac<Sha256> as Mac>::new_from_slice(&[5; 32]).expect("any key length");
        for part in [PROOF_LABEL, b"A".as_slice(), b"B", b"nb", b"na"] {
            reference.update(&(part.len() as u64).to_be_bytes());
            reference.update(part);
        }
        assert_eq!(
            secret.prove("A", "B", b"nb", b"na"),
            reference.finalize().into_bytes().to_vec()
        );
    }

    #[test]
    fn proofs_bind_the_secret_both_peers_and_both_nonces() {
        let secret = MeshSecret::from_bytes([1; 32]);
        let other = MeshSecret::from_bytes([2; 32]);
        let proof = secret.prove("A", "B", b"nb", b"na");
        assert!(secret.verify("A", "B", b"nb", b"na", &proof));
        assert!(
            !other.verify("A", "B", b"nb", b"na", &proof),
            "another mesh"
        );
        assert!(
            !secret.verify("C", "B", b"nb", b"na", &proof),
            "another prover"
        );
        assert!(
            !secret.verify("A", "C", b"nb", b"na", &proof),
            "relayed to another verifier"
        );
        assert!(
            !secret.verify("A", "B", b"nX", b"na", &proof),
            "replayed challenge"
        );
        assert!(
            !secret.verify("A", "B", b"nb", b"na", &proof[..31]),
            "cut proof"
        );
        assert_ne!(secret.fingerprint(), other.fingerprint());
        assert_eq!(secret.fingerprint().len(), 16);
    }
}
