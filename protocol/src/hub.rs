//! The Hikma Health sync hub's encrypted RPC, both ends of its cryptography
//! (`HIKMA_HUB_RPC.md`): what a node needs to answer the unmodified Hikma app as its
//! hub, and what a test client needs to talk to it. No I/O.
//!
//! - **Handshake.** The app sends an ephemeral X25519 public key; the hub's is static
//!   (the one in its pairing QR code). Both derive one AES-256 key with
//!   HKDF-SHA256 (the X25519 output as input key material, salt
//!   `hikma-health-pairing-v1`, info = hub public key then client public key).
//! - **Sealed payloads.** `base64url-nopad(nonce (12, random) | ciphertext | tag (16))`,
//!   AES-256-GCM, with the associated data naming the endpoint and direction
//!   ([`Aad`]). The plaintext is UTF-8 JSON.

use aws_lc_rs::aead::{AES_256_GCM, Aad as GcmAad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The HKDF salt of the pairing.
pub const SALT: &[u8] = b"hikma-health-pairing-v1";
/// A sealed payload's smallest size: nonce and tag.
pub const MIN_SEALED: usize = NONCE_LEN + TAG_LEN;
const TAG_LEN: usize = 16;

/// What a sealed payload is: its associated data, exactly as the app uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aad {
    /// A request to `/rpc/command`.
    Command,
    /// The answer to a command.
    CommandResponse,
    /// A request to `/rpc/query`.
    Query,
    /// The answer to a query.
    QueryResponse,
}

impl Aad {
    /// The associated data's text.
    pub fn text(self) -> &'static str {
        match self {
            Aad::Command => "command",
            Aad::CommandResponse => "command_response",
            Aad::Query => "query",
            Aad::QueryResponse => "query_response",
        }
    }
}

/// What went wrong with a handshake or a sealed payload (said to nobody but the log: the
/// app learns only that it failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// Not base64url without padding.
    #[error("the value is not base64url without padding")]
    Encoding,
    /// A public key that is not 32 bytes, or whose shared point is zero.
    #[error("the public key is not a usable X25519 key")]
    BadKey,
    /// Too short, or it does not decrypt under this key and associated data.
    #[error("the payload does not decrypt with this session's key")]
    Undecryptable,
    /// The key material could not be made.
    #[error("the key could not be made: {0}")]
    Crypto(&'static str),
}

/// The hub's static X25519 key pair.
pub struct HubKey {
    private: PrivateKey,
    public: [u8; 32],
}

impl std::fmt::Debug for HubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubKey")
            .field("public", &b64(&self.public))
            .finish_non_exhaustive()
    }
}

impl HubKey {
    /// A new random key pair.
    pub fn generate() -> Result<Self, HubError> {
        let private =
            PrivateKey::generate(&X25519).map_err(|_| HubError::Crypto("no random key"))?;
        Self::from_private(private)
    }

    /// The key pair of this 32-byte private key.
    pub fn from_bytes(secret: &[u8; 32]) -> Result<Self, HubError> {
        let private =
            PrivateKey::from_private_key(&X25519, secret).map_err(|_| HubError::BadKey)?;
        Self::from_private(private)
    }

    fn from_private(private: PrivateKey) -> Result<Self, HubError> {
        let public = private
            .compute_public_key()
            .map_err(|_| HubError::Crypto("no public key"))?;
        let public: [u8; 32] = public
            .as_ref()
            .try_into()
            .map_err(|_| HubError::Crypto("a public key of another size"))?;
        Ok(Self { private, public })
    }

    /// The private key's 32 bytes (to keep it, sealed).
    pub fn secret_bytes(&self) -> Result<[u8; 32], HubError> {
        let seed: Curve25519SeedBin<'_> = self
            .private
            .as_be_bytes()
            .map_err(|_| HubError::Crypto("the private key cannot be read"))?;
        seed.as_ref()
            .try_into()
            .map_err(|_| HubError::Crypto("a private key of another size"))
    }

    /// The public key, as in the pairing QR code and the handshake's answer.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The session key for a client whose handshake sent `client_public`.
    pub fn session_key(&self, client_public: &[u8]) -> Result<[u8; 32], HubError> {
        let shared = x25519(&self.private, client_public)?;
        derive(&shared, &self.public, client_public)
    }

    /// The client's side of the same handshake, with this key pair as the client's
    /// (ephemeral) one: the key it shares with the hub whose public key is `hub_public`.
    pub fn client_session_key(&self, hub_public: &[u8]) -> Result<[u8; 32], HubError> {
        let shared = x25519(&self.private, hub_public)?;
        derive(&shared, hub_public, &self.public)
    }
}

fn x25519(private: &PrivateKey, public: &[u8]) -> Result<Vec<u8>, HubError> {
    if public.len() != 32 {
        return Err(HubError::BadKey);
    }
    // aws-lc refuses a shared point of zero (a low-order public key).
    agreement::agree(
        private,
        UnparsedPublicKey::new(&X25519, public),
        HubError::BadKey,
        |shared| Ok(shared.to_vec()),
    )
}

fn derive(shared: &[u8], hub_public: &[u8], client_public: &[u8]) -> Result<[u8; 32], HubError> {
    let info = [hub_public, client_public].concat();
    let info = [info.as_slice()];
    let prk = Salt::new(HKDF_SHA256, SALT).extract(shared);
    let okm = prk
        .expand(&info, HKDF_SHA256)
        .map_err(|_| HubError::Crypto("HKDF"))?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).map_err(|_| HubError::Crypto("HKDF"))?;
    Ok(key)
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Reads base64url without padding (padding, `+` and `/` are refused, as the app does).
pub fn unb64(text: &str) -> Result<Vec<u8>, HubError> {
    URL_SAFE_NO_PAD
        .decode(text.as_bytes())
        .map_err(|_| HubError::Encoding)
}

fn cipher(key: &[u8; 32]) -> Result<LessSafeKey, HubError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| HubError::Crypto("AES-256-GCM"))
}

/// Seals `plain` under `key` with a random nonce.
pub fn seal(key: &[u8; 32], aad: Aad, plain: &[u8]) -> Result<String, HubError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| HubError::Crypto("no random nonce"))?;
    seal_with_nonce(key, &nonce, aad, plain)
}

/// Seals `plain` under `key` with this nonce (tests compare with known answers; use
/// [`seal`] otherwise).
pub fn seal_with_nonce(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: Aad,
    plain: &[u8],
) -> Result<String, HubError> {
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(nonce);
    out.extend_from_slice(plain);
    let tag = cipher(key)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            GcmAad::from(aad.text().as_bytes()),
            &mut out[NONCE_LEN..],
        )
        .map_err(|_| HubError::Crypto("sealing"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(b64(&out))
}

/// Opens a sealed payload: its plaintext and its nonce (a repeated nonce is a replay).
pub fn open(
    key: &[u8; 32],
    aad: Aad,
    payload: &str,
) -> Result<(Vec<u8>, [u8; NONCE_LEN]), HubError> {
    let bytes = unb64(payload)?;
    if bytes.len() < MIN_SEALED {
        return Err(HubError::Undecryptable);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[..NONCE_LEN]);
    let mut text = bytes[NONCE_LEN..].to_vec();
    let plain = cipher(key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            GcmAad::from(aad.text().as_bytes()),
            &mut text,
        )
        .map_err(|_| HubError::Undecryptable)?;
    let len = plain.len();
    text.truncate(len);
    Ok((text, nonce))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_one_key_and_a_payload_opens_only_as_sealed() {
        let hub = HubKey::generate().expect("hub");
        let client = HubKey::generate().expect("client");
        let at_hub = hub.session_key(&client.public()).expect("hub side");
        let at_client = client
            .client_session_key(&hub.public())
            .expect("client side");
        assert_eq!(at_hub, at_client);
        let again = HubKey::from_bytes(&hub.secret_bytes().expect("bytes")).expect("again");
        assert_eq!(again.public(), hub.public());

        let sealed = seal(&at_hub, Aad::Command, br#"{"command":"ping"}"#).expect("seal");
        assert!(!sealed.contains('=') && !sealed.contains('+') && !sealed.contains('/'));
        let (plain, _) = open(&at_client, Aad::Command, &sealed).expect("open");
        assert_eq!(plain, br#"{"command":"ping"}"#);
        // Another direction's associated data, another key, damage, padding: refused.
        assert_eq!(
            open(&at_client, Aad::CommandResponse, &sealed),
            Err(HubError::Undecryptable)
        );
        assert_eq!(
            open(&[9u8; 32], Aad::Command, &sealed),
            Err(HubError::Undecryptable)
        );
        assert_eq!(
            open(&at_hub, Aad::Command, "AAAA"),
            Err(HubError::Undecryptable)
        );
        assert_eq!(
            open(&at_hub, Aad::Command, &format!("{sealed}=")),
            Err(HubError::Encoding)
        );
        // A low-order public key (all zeros) gives no key.
        assert_eq!(hub.session_key(&[0u8; 32]), Err(HubError::BadKey));
        assert_eq!(hub.session_key(&[1u8; 31]), Err(HubError::BadKey));
    }
}
