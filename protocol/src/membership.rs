//! Who belongs to a mesh, and how a peer proves it.
//!
//! A mesh has a **root of trust**: an owner key (Ed25519) made by the first `init` and
//! held only by admin devices. Its public half, the [`MeshRoot`], is known to every
//! member. Each device holds a [`DeviceCert`] signed by the owner key that binds its
//! libp2p peer id to a name, a kind, optional clinic ids, an issue time and an optional
//! expiry. In the sync handshake each side presents its certificate; the other checks
//! the owner's signature, that the certificate names the peer id the transport (noise)
//! authenticated, that it has not expired and that its device is not revoked. Noise
//! already proves that the peer holds the key of that peer id, so the certificate is all
//! a peer adds: a certificate copied from another device is worthless.
//!
//! A [`Revocation`] is signed by the owner key too, and travels as a record like any
//! other; a device may verify one whoever relayed it.
//!
//! An [`Invite`] admits one device: it carries a random token whose hash the inviting
//! admin device keeps until it is used or expires. The joining device presents the token
//! to the inviter over the mesh transport ([`EnrollRequest`]) and gets its certificate
//! ([`EnrollAnswer`]).
//!
//! The mesh's [`fingerprint`](MeshRoot::fingerprint) is sent only inside the encrypted
//! transport. On the LAN (mDNS) a node advertises a [`discovery
//! tag`](MeshRoot::discovery_tag) that changes every hour and that only members, who know
//! the root, can recognise.
//!
//! Everything decoded here comes from outside the process: sizes are bounded and every
//! failure is a [`TrustError`] that names what was wrong.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

/// Text that starts every invite, with the invite format version.
pub const INVITE_PREFIX: &str = "medmesh-invite-2:";
/// The prefix of invites of medmesh before device certificates.
pub const OLD_INVITE_PREFIX: &str = "medmesh-invite-1:";
/// Text that starts a certificate in its text form.
pub const CERT_PREFIX: &str = "medmesh-cert-1:";
/// Text that starts a revocation in its text form.
pub const REVOCATION_PREFIX: &str = "medmesh-revocation-1:";

const CERT_LABEL: &[u8] = b"medmesh/device-cert/1";
const REVOCATION_LABEL: &[u8] = b"medmesh/revocation/1";
const FINGERPRINT_LABEL: &[u8] = b"medmesh/mesh-fingerprint/2";
const DISCOVERY_LABEL: &[u8] = b"medmesh/discovery/1";
const PEER_SEAL_LABEL: &[u8] = b"medmesh/discovery-peer/1";
/// Longest peer id a discovery advert seals.
const MAX_SEALED_PEER: usize = 96;
const LEGACY_OWNER_LABEL: &[u8] = b"medmesh/owner-from-mesh-secret/1";

/// Largest encoded certificate, revocation or invite accepted (bytes before base64).
pub const MAX_ENCODED: usize = 8 * 1024;
/// Longest device name.
pub const MAX_NAME: usize = 100;
/// Most clinic ids in one certificate.
pub const MAX_CLINICS: usize = 64;
/// Longest clinic id, peer id or revocation reason.
pub const MAX_FIELD: usize = 200;
/// How long a discovery tag lasts.
pub const DISCOVERY_PERIOD_MS: u64 = 60 * 60 * 1000;

/// Why a certificate, revocation or invite was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Not of the expected kind at all.
    #[error("this is not a medmesh {what}: it should start with `{prefix}`")]
    NotThis {
        /// What was expected.
        what: &'static str,
        /// Its prefix.
        prefix: &'static str,
    },
    /// An invite of medmesh before device certificates.
    #[error(
        "this invite was made by a medmesh from before device certificates and is no longer accepted; ask an admin of the mesh for a new one (`medmesh invite` on an admin device)"
    )]
    OldInvite,
    /// Cut, mistyped or not decodable.
    #[error("this {0} is damaged (cut short or mistyped); copy it again")]
    Damaged(&'static str),
    /// Larger than anything medmesh makes.
    #[error("this {0} is too large to be genuine")]
    TooLarge(&'static str),
    /// A field out of its bounds.
    #[error("this {what} has a field out of bounds: {field}")]
    OutOfBounds {
        /// What was checked.
        what: &'static str,
        /// The field.
        field: &'static str,
    },
    /// Signed under another mesh's root.
    #[error("this {0} belongs to another mesh")]
    OtherMesh(&'static str),
    /// The owner's signature does not match.
    #[error("the signature of this {0} is not the mesh owner's (forged or altered)")]
    BadSignature(&'static str),
    /// The certificate names another device than the one presenting it.
    #[error("the certificate is for device {cert_peer}, not for the device that presented it")]
    OtherPeer {
        /// The peer id in the certificate.
        cert_peer: String,
    },
    /// Past its expiry.
    #[error(
        "the certificate expired at {at} (ms since 1970); an admin must admit the device again"
    )]
    Expired {
        /// Its expiry.
        at: i64,
    },
    /// The device was revoked.
    #[error("the device was revoked by an admin of the mesh")]
    Revoked,
}

/// What a device is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A tablet or phone of the clinic.
    Tablet,
    /// A gateway laptop that reaches the cloud.
    Gateway,
    /// An admin device: holds the owner key, admits and revokes devices.
    Admin,
}

impl DeviceKind {
    /// Its name as written in commands and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Tablet => "tablet",
            DeviceKind::Gateway => "gateway",
            DeviceKind::Admin => "admin",
        }
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tablet" => Ok(DeviceKind::Tablet),
            "gateway" => Ok(DeviceKind::Gateway),
            "admin" => Ok(DeviceKind::Admin),
            other => Err(format!(
                "`{other}` is not a kind of device; use tablet, gateway or admin"
            )),
        }
    }
}

/// The public key of a mesh's owner: what every member checks certificates and
/// revocations against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MeshRoot(VerifyingKey);

impl std::fmt::Debug for MeshRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshRoot({})", self.fingerprint())
    }
}

impl MeshRoot {
    /// The root from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TrustError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TrustError::Damaged("mesh root"))?;
        VerifyingKey::from_bytes(&bytes)
            .map(MeshRoot)
            .map_err(|_| TrustError::Damaged("mesh root"))
    }

    /// Its 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The mesh's fingerprint (16 hex digits), sent only inside the encrypted transport.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(FINGERPRINT_LABEL);
        hash.update(self.0.as_bytes());
        hex::encode(&hash.finalize()[..8])
    }

    /// The discovery tag for the period that holds `now_ms`: 16 hex digits that change
    /// every [`DISCOVERY_PERIOD_MS`] and that only holders of the root can compute.
    pub fn discovery_tag(&self, now_ms: u64) -> String {
        let period = now_ms / DISCOVERY_PERIOD_MS;
        let mut hash = Sha256::new();
        hash.update(DISCOVERY_LABEL);
        hash.update(self.0.as_bytes());
        hash.update(period.to_be_bytes());
        hex::encode(&hash.finalize()[..8])
    }

    /// Whether `tag` is this mesh's tag for the period of `now_ms` or a neighbouring one
    /// (clocks of tablets differ).
    pub fn recognises(&self, tag: &str, now_ms: u64) -> bool {
        self.tag_period(tag, now_ms).is_some()
    }

    /// The period whose tag `tag` is, of those around `now_ms`.
    pub fn tag_period(&self, tag: &str, now_ms: u64) -> Option<u64> {
        [
            now_ms.saturating_sub(DISCOVERY_PERIOD_MS),
            now_ms,
            now_ms.saturating_add(DISCOVERY_PERIOD_MS),
        ]
        .into_iter()
        .find(|t| self.discovery_tag(*t) == tag)
        .map(|t| t / DISCOVERY_PERIOD_MS)
    }

    fn peer_keystream(&self, period: u64, nonce: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut block = 0u32;
        while out.len() < len {
            let mut hash = Sha256::new();
            hash.update(PEER_SEAL_LABEL);
            hash.update(self.0.as_bytes());
            hash.update(period.to_be_bytes());
            hash.update(nonce);
            hash.update(block.to_be_bytes());
            out.extend_from_slice(&hash.finalize());
            block += 1;
        }
        out.truncate(len);
        out
    }

    /// Seals a peer id for the discovery advert of the period of `now_ms` (hex): only
    /// members can open it, and with a fresh `nonce` per advert two adverts, of one
    /// device or of two, share nothing an observer could link. `None` for an id longer
    /// than any libp2p peer id.
    pub fn seal_peer(&self, peer_id: &str, now_ms: u64, nonce: [u8; 8]) -> Option<String> {
        let plain = peer_id.as_bytes();
        if plain.is_empty() || plain.len() > MAX_SEALED_PEER {
            return None;
        }
        let stream = self.peer_keystream(now_ms / DISCOVERY_PERIOD_MS, &nonce, plain.len());
        let sealed: Vec<u8> = plain.iter().zip(stream).map(|(p, k)| p ^ k).collect();
        Some(format!("{}{}", hex::encode(nonce), hex::encode(sealed)))
    }

    /// Opens a peer id sealed by [`MeshRoot::seal_peer`] for `period` (see
    /// [`MeshRoot::tag_period`]); `None` when it is not one.
    pub fn open_peer(&self, sealed: &str, period: u64) -> Option<String> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() <= 8 || bytes.len() > 8 + MAX_SEALED_PEER {
            return None;
        }
        let (nonce, body) = bytes.split_at(8);
        let stream = self.peer_keystream(period, nonce, body.len());
        let plain: Vec<u8> = body.iter().zip(stream).map(|(c, k)| c ^ k).collect();
        String::from_utf8(plain)
            .ok()
            .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric()))
    }

    fn verify(
        &self,
        label: &[u8],
        body: &[u8],
        sig: &[u8],
        what: &'static str,
    ) -> Result<(), TrustError> {
        let sig: [u8; 64] = sig.try_into().map_err(|_| TrustError::Damaged(what))?;
        let mut message = Vec::with_capacity(label.len() + body.len());
        message.extend_from_slice(label);
        message.extend_from_slice(body);
        self.0
            .verify_strict(&message, &Signature::from_bytes(&sig))
            .map_err(|_| TrustError::BadSignature(what))
    }

    /// Checks `cert` for a session with `peer` at `now_ms`: signed by this root, for that
    /// peer, not expired, not revoked (`revoked` answers for a peer id).
    pub fn check_cert(
        &self,
        cert: &SignedCert,
        peer: &str,
        now_ms: i64,
        revoked: impl Fn(&str) -> bool,
    ) -> Result<DeviceCert, TrustError> {
        let body = self.open_cert(cert)?;
        if body.peer_id != peer {
            return Err(TrustError::OtherPeer {
                cert_peer: body.peer_id,
            });
        }
        if let Some(at) = body.expires_at
            && at <= now_ms
        {
            return Err(TrustError::Expired { at });
        }
        if revoked(&body.peer_id) {
            return Err(TrustError::Revoked);
        }
        Ok(body)
    }

    /// The certificate's content when the owner of this root signed it (expiry and
    /// revocation not checked: see [`MeshRoot::check_cert`]).
    pub fn open_cert(&self, cert: &SignedCert) -> Result<DeviceCert, TrustError> {
        let body: DeviceCert = decode(&cert.body, "certificate")?;
        if body.root.as_slice() != self.0.as_bytes() {
            return Err(TrustError::OtherMesh("certificate"));
        }
        self.verify(CERT_LABEL, &cert.body, &cert.sig, "certificate")?;
        body.check_bounds()?;
        Ok(body)
    }

    /// The revocation's content when the owner of this root signed it.
    pub fn open_revocation(&self, revocation: &SignedRevocation) -> Result<Revocation, TrustError> {
        let body: Revocation = decode(&revocation.body, "revocation")?;
        if body.root.as_slice() != self.0.as_bytes() {
            return Err(TrustError::OtherMesh("revocation"));
        }
        self.verify(
            REVOCATION_LABEL,
            &revocation.body,
            &revocation.sig,
            "revocation",
        )?;
        if body.peer_id.len() > MAX_FIELD || body.reason.len() > MAX_FIELD * 5 {
            return Err(TrustError::OutOfBounds {
                what: "revocation",
                field: "peer_id or reason",
            });
        }
        Ok(body)
    }
}

/// The owner key of a mesh: signs certificates and revocations. Held by admin devices.
#[derive(Clone)]
pub struct OwnerKey(SigningKey);

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OwnerKey({})", self.root().fingerprint())
    }
}

impl OwnerKey {
    /// The key from its 32-byte seed (made with a secure random generator by the caller).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Its seed, for storing it.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The mesh root it signs for.
    pub fn root(&self) -> MeshRoot {
        MeshRoot(self.0.verifying_key())
    }

    fn sign(&self, label: &[u8], body: &[u8]) -> Vec<u8> {
        let mut message = Vec::with_capacity(label.len() + body.len());
        message.extend_from_slice(label);
        message.extend_from_slice(body);
        self.0.sign(&message).to_bytes().to_vec()
    }

    /// Signs a certificate (its `root` is set to this key's).
    pub fn issue(&self, mut cert: DeviceCert) -> Result<SignedCert, TrustError> {
        cert.root = ByteBuf::from(self.root().to_bytes().to_vec());
        cert.check_bounds()?;
        let body = encode(&cert);
        let sig = self.sign(CERT_LABEL, &body);
        Ok(SignedCert {
            body: ByteBuf::from(body),
            sig: ByteBuf::from(sig),
        })
    }

    /// Signs the revocation of `peer_id`.
    pub fn revoke(
        &self,
        peer_id: &str,
        reason: &str,
        revoked_at: i64,
    ) -> Result<SignedRevocation, TrustError> {
        if peer_id.len() > MAX_FIELD || reason.len() > MAX_FIELD * 5 {
            return Err(TrustError::OutOfBounds {
                what: "revocation",
                field: "peer_id or reason",
            });
        }
        let body = encode(&Revocation {
            version: 1,
            root: ByteBuf::from(self.root().to_bytes().to_vec()),
            peer_id: peer_id.to_owned(),
            reason: reason.to_owned(),
            revoked_at,
        });
        let sig = self.sign(REVOCATION_LABEL, &body);
        Ok(SignedRevocation {
            body: ByteBuf::from(body),
            sig: ByteBuf::from(sig),
        })
    }
}

/// The content of a device certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCert {
    /// Format version (1).
    pub version: u8,
    /// The mesh root that signed it (32 bytes).
    pub root: ByteBuf,
    /// The device's libp2p peer id.
    pub peer_id: String,
    /// A name people recognise ("pharmacy tablet 2").
    pub name: String,
    /// What the device is for.
    pub kind: DeviceKind,
    /// The clinics it serves (none: all).
    pub clinics: Vec<String>,
    /// When it was issued (ms since 1970).
    pub issued_at: i64,
    /// When it stops being valid (ms since 1970), if ever.
    pub expires_at: Option<i64>,
}

impl DeviceCert {
    /// A certificate for `peer_id`, to be signed by [`OwnerKey::issue`].
    pub fn new(peer_id: &str, name: &str, kind: DeviceKind, issued_at: i64) -> Self {
        Self {
            version: 1,
            root: ByteBuf::new(),
            peer_id: peer_id.to_owned(),
            name: name.to_owned(),
            kind,
            clinics: Vec::new(),
            issued_at,
            expires_at: None,
        }
    }

    fn check_bounds(&self) -> Result<(), TrustError> {
        let field = if self.version != 1 {
            "version"
        } else if self.peer_id.is_empty() || self.peer_id.len() > MAX_FIELD {
            "peer_id"
        } else if self.name.chars().count() > MAX_NAME {
            "name"
        } else if self.clinics.len() > MAX_CLINICS
            || self.clinics.iter().any(|c| c.len() > MAX_FIELD)
        {
            "clinics"
        } else {
            return Ok(());
        };
        Err(TrustError::OutOfBounds {
            what: "certificate",
            field,
        })
    }
}

/// A certificate as signed: its encoded content and the owner's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCert {
    /// The CBOR of a [`DeviceCert`].
    pub body: ByteBuf,
    /// Ed25519 signature by the owner key over the label and `body`.
    pub sig: ByteBuf,
}

impl SignedCert {
    /// Its text form (for files and records).
    pub fn to_text(&self) -> String {
        format!("{CERT_PREFIX}{}", URL_SAFE_NO_PAD.encode(encode(self)))
    }

    /// Reads the text form (the signature is checked by [`MeshRoot::open_cert`]).
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        from_text(text, CERT_PREFIX, "certificate")
    }

    /// Its bytes, for the handshake.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Reads the bytes made by [`SignedCert::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_ENCODED {
            return Err(TrustError::TooLarge("certificate"));
        }
        decode(bytes, "certificate")
    }
}

/// The content of a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Format version (1).
    pub version: u8,
    /// The mesh root that signed it.
    pub root: ByteBuf,
    /// The revoked device.
    pub peer_id: String,
    /// Why, in the admin's words.
    pub reason: String,
    /// When (ms since 1970).
    pub revoked_at: i64,
}

/// A revocation as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocation {
    /// The CBOR of a [`Revocation`].
    pub body: ByteBuf,
    /// Ed25519 signature by the owner key over the label and `body`.
    pub sig: ByteBuf,
}

impl SignedRevocation {
    /// Its text form (kept in the replicated record).
    pub fn to_text(&self) -> String {
        format!(
            "{REVOCATION_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(encode(self))
        )
    }

    /// Reads the text form (the signature is checked by [`MeshRoot::open_revocation`]).
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        from_text(text, REVOCATION_PREFIX, "revocation")
    }
}

/// An invite: admits one device until it expires. One-letter field names keep its text
/// (and its QR code) short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The mesh root (32 bytes).
    #[serde(rename = "r")]
    pub root: ByteBuf,
    /// The single-use token (32 random bytes); the inviter keeps only its hash.
    #[serde(rename = "t")]
    pub token: ByteBuf,
    /// The inviting device's peer id (it redeems the token).
    #[serde(rename = "i")]
    pub inviter: String,
    /// Where the inviter can be reached (libp2p addresses).
    #[serde(rename = "a")]
    pub addrs: Vec<String>,
    /// When it stops being accepted (ms since 1970).
    #[serde(rename = "e")]
    pub expires_at: i64,
}

impl Invite {
    /// Its text form: what `medmesh invite` prints and `init --join` takes.
    pub fn to_text(&self) -> String {
        format!("{INVITE_PREFIX}{}", URL_SAFE_NO_PAD.encode(encode(self)))
    }

    /// Reads an invite's text form.
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        if text.trim().starts_with(OLD_INVITE_PREFIX) {
            return Err(TrustError::OldInvite);
        }
        let invite: Invite = from_text(text, INVITE_PREFIX, "invite")?;
        if invite.token.len() != 32
            || invite.inviter.len() > MAX_FIELD
            || invite.addrs.len() > 16
            || invite.addrs.iter().any(|a| a.len() > MAX_FIELD)
        {
            return Err(TrustError::Damaged("invite"));
        }
        MeshRoot::from_bytes(&invite.root).map_err(|_| TrustError::Damaged("invite"))?;
        Ok(invite)
    }

    /// The mesh root it admits to.
    pub fn root(&self) -> Result<MeshRoot, TrustError> {
        MeshRoot::from_bytes(&self.root)
    }

    /// The hash of its token: what the inviter keeps.
    pub fn token_hash(&self) -> String {
        token_hash(&self.token)
    }
}

/// The hash under which an inviter keeps a token (hex).
pub fn token_hash(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

/// What a joining device sends to the inviter on the enrollment stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The invite's token.
    pub token: ByteBuf,
    /// The name the device asks for (the invite's name wins when it set one).
    pub name: String,
}

/// The inviter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollAnswer {
    /// Admitted: the device's certificate, and the owner key's seed for an admin device.
    Admitted {
        /// The certificate.
        cert: SignedCert,
        /// The owner key (admin devices only).
        owner_key: Option<ByteBuf>,
    },
    /// Not admitted, and why, for the person at the device.
    Refused {
        /// The reason.
        reason: String,
    },
}

/// Encodes an enrollment message.
pub fn encode_enroll<T: Serialize>(message: &T) -> Vec<u8> {
    encode(message)
}

/// Decodes an enrollment message from a peer (bounded).
pub fn decode_enroll<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, TrustError> {
    if bytes.len() > MAX_ENCODED * 2 {
        return Err(TrustError::TooLarge("enrollment message"));
    }
    decode(bytes, "enrollment message")
}

/// The shared secret of a mesh made before device certificates (`mesh.key`). An upgraded
/// node derives the mesh's owner key from it, so every device of such a mesh arrives in
/// the same mesh without an exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct MeshSecret([u8; 32]);

impl std::fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshSecret(..)")
    }
}

impl MeshSecret {
    /// The secret from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The owner key every upgraded device of this mesh derives alike.
    pub fn owner_key(&self) -> OwnerKey {
        let mut hash = Sha256::new();
        hash.update(LEGACY_OWNER_LABEL);
        hash.update(self.0);
        OwnerKey::from_seed(hash.finalize().into())
    }
}

/// What a node holds to prove it belongs to its mesh, and to check others.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The mesh's root.
    pub root: MeshRoot,
    /// This device's certificate.
    pub cert: SignedCert,
    /// Peer ids revoked so far (shared with the node, which adds to it).
    pub revoked: RevokedSet,
}

impl Credential {
    /// A credential of `owner`'s mesh for the device `peer` (a tablet certificate issued
    /// at `issued_at`): for tools and tests that act as a device of a mesh.
    pub fn issued(owner: &OwnerKey, peer: &str, issued_at: i64) -> Result<Self, TrustError> {
        Ok(Self {
            root: owner.root(),
            cert: owner.issue(DeviceCert::new(peer, peer, DeviceKind::Tablet, issued_at))?,
            revoked: RevokedSet::default(),
        })
    }

    /// The fingerprint of the mesh this credential belongs to.
    pub fn fingerprint(&self) -> String {
        self.root.fingerprint()
    }
}

/// The revoked peer ids, each with when it was revoked, shared between the node (which
/// learns revocations), its sessions (which refuse those peers) and its store (which
/// refuses their changes dated after).
#[derive(Debug, Clone, Default)]
pub struct RevokedSet(std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, i64>>>);

impl RevokedSet {
    /// Whether `peer` is revoked.
    pub fn contains(&self, peer: &str) -> bool {
        self.0
            .read()
            .map(|set| set.contains_key(peer))
            .unwrap_or(true)
    }

    /// When `peer` was revoked (ms since 1970), if it was.
    pub fn revoked_at(&self, peer: &str) -> Option<i64> {
        match self.0.read() {
            Ok(set) => set.get(peer).copied(),
            Err(_) => Some(i64::MIN),
        }
    }

    /// Adds `peer`, revoked at `at`; answers whether it was new. Of two revocations of
    /// one device, the earlier counts.
    pub fn insert(&self, peer: &str, at: i64) -> bool {
        self.0
            .write()
            .map(|mut set| match set.get_mut(peer) {
                Some(known) => {
                    *known = (*known).min(at);
                    false
                }
                None => {
                    set.insert(peer.to_owned(), at);
                    true
                }
            })
            .unwrap_or(false)
    }

    /// Whether no device is revoked.
    pub fn is_empty(&self) -> bool {
        self.0.read().map(|set| set.is_empty()).unwrap_or(false)
    }

    /// Every revoked peer id.
    pub fn all(&self) -> Vec<String> {
        self.0
            .read()
            .map(|set| set.keys().cloned().collect())
            .unwrap_or_default()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing CBOR into a Vec fails only for a value serde cannot express, which none
    // of the types here is.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, TrustError> {
    if bytes.len() > MAX_ENCODED {
        return Err(TrustError::TooLarge(what));
    }
    ciborium::de::from_reader_with_recursion_limit(bytes, 16).map_err(|_| TrustError::Damaged(what))
}

fn from_text<T: for<'de> Deserialize<'de>>(
    text: &str,
    prefix: &'static str,
    what: &'static str,
) -> Result<T, TrustError> {
    let rest = text
        .trim()
        .strip_prefix(prefix)
        .ok_or(TrustError::NotThis { what, prefix })?;
    if rest.len() > MAX_ENCODED * 2 {
        return Err(TrustError::TooLarge(what));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(rest.trim())
        .map_err(|_| TrustError::Damaged(what))?;
    decode(&bytes, what)
}

#[cfg(test)]
mod tests;
