//! This device's place in its mesh: the mesh root, the device's certificate, the owner
//! key on admin devices, pending invites, the replicated device list and revocations.
//!
//! Files in the data directory (secrets readable by their owner only):
//! - `mesh.root`: the mesh's root (public key, hex);
//! - `device.cert`: this device's certificate (text form);
//! - `owner.key`: the owner key's seed (hex), on admin devices only;
//! - `invites/<token hash>`: an invite not used yet (expiry, kind, name, clinics);
//!   redeeming renames it to `<token hash>.used`, which only one caller can do, so an
//!   invite admits one device even when two race for it;
//! - `mesh.key`: the shared secret of a mesh made before certificates; such a directory
//!   is upgraded in place at its first open (see [`load_or_found`]).
//!
//! The files are written by the CLI (`init`, `invite`) and read by the node; the node
//! writes only the `invites/` renames (redeeming) and its replicated records.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use chrono::Utc;
use medmesh_protocol::authorship::Authority;
use medmesh_protocol::membership::{
    Credential, DeviceCert, DeviceKind, EnrollAnswer, Invite, MeshRoot, MeshSecret, OwnerKey,
    RevokedSet, SignedCert, SignedRevocation, token_hash,
};
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::{DEVICES_COLLECTION, REVOCATIONS_COLLECTION};
use medmesh_protocol::{ChangeAuthor, DocId};
use medmesh_storage::{Query, Store, StoreError, WriteBatch, WriteKind, WriteOp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The mesh root's file.
pub const ROOT_FILE: &str = "mesh.root";
/// This device's certificate's file.
pub const CERT_FILE: &str = "device.cert";
/// The owner key's file (admin devices).
pub const OWNER_FILE: &str = "owner.key";
/// The directory of pending invites.
pub const INVITES_DIR: &str = "invites";
/// The shared secret of a mesh made before certificates.
pub const LEGACY_SECRET_FILE: &str = "mesh.key";
/// Present while a device is joining a mesh (`init --join`), so that a join that did not
/// complete is not mistaken for a new mesh at the next start.
pub const JOINING_FILE: &str = "joining";

/// This device's trust: who the mesh is, who this device is, what it may sign.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The mesh's root.
    pub root: MeshRoot,
    /// This device's certificate.
    pub cert: SignedCert,
    /// Its content.
    pub device: DeviceCert,
    /// The owner key, on admin devices.
    pub owner: Option<OwnerKey>,
    /// Devices revoked so far (filled from the replicated revocations).
    pub revoked: RevokedSet,
}

impl Trust {
    /// The credential the sync sessions present and check with.
    pub fn credential(&self) -> Credential {
        Credential {
            root: self.root,
            cert: self.cert.clone(),
            revoked: self.revoked.clone(),
        }
    }

    /// The owner key, or an error for the person at a device that is not an admin.
    pub fn owner(&self) -> Result<&OwnerKey> {
        self.owner.as_ref().ok_or_else(|| {
            anyhow!(
                "this device is not an admin device of the mesh (it does not hold the owner key); do this on an admin device"
            )
        })
    }
}

/// How [`load_or_found`] found the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Founding {
    /// It already belonged to a mesh.
    Member,
    /// It founded a new mesh (this device is its first admin).
    Founded,
    /// It belonged to a mesh of the shared-secret format and was upgraded.
    Upgraded,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn write_secret_file(path: &Path, text: &str) -> Result<()> {
    crate::files::write_private(path, text)
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(anyhow!("cannot read {}: {err}", path.display())),
    }
}

fn damaged(path: &Path) -> anyhow::Error {
    anyhow!(
        "{} is damaged; restore the data directory from a backup, or join the mesh again with a new invite in a new data directory",
        path.display()
    )
}

/// The mesh root of a data directory, if it belongs to a mesh.
pub fn read_root(dir: &Path) -> Result<Option<MeshRoot>> {
    let path = dir.join(ROOT_FILE);
    match read_text(&path)? {
        None => Ok(None),
        Some(text) => hex::decode(&text)
            .ok()
            .and_then(|b| MeshRoot::from_bytes(&b).ok())
            .map(Some)
            .ok_or_else(|| damaged(&path)),
    }
}

/// Writes the owner key, sealed with the directory's data key when it has one.
fn write_owner(dir: &Path, owner: &OwnerKey) -> Result<()> {
    let seed = hex::encode(owner.seed());
    let text = match crate::keys::data_key(dir)? {
        Some(key) => crate::keys::seal(key.as_bytes(), seed.as_bytes())?,
        None => seed,
    };
    write_secret_file(&dir.join(OWNER_FILE), &text)
}

/// Seals the secret files an older medmesh wrote in the clear — the owner key, and the
/// shared secret of a mesh from before certificates (from which the owner key derives)
/// — with the directory's data key.
pub fn seal_secret_files(dir: &Path) -> Result<()> {
    let Some(key) = crate::keys::data_key(dir)? else {
        return Ok(());
    };
    for name in [OWNER_FILE, LEGACY_SECRET_FILE] {
        let path = dir.join(name);
        if let Some(text) = read_text(&path)?
            && !crate::keys::is_sealed(&text)
        {
            write_secret_file(&path, &crate::keys::seal(key.as_bytes(), text.as_bytes())?)?;
        }
    }
    Ok(())
}

/// The text of a secret file of `dir`, opened with the data key when it is sealed.
fn read_secret_text(dir: &Path, path: &Path) -> Result<Option<String>> {
    match read_text(path)? {
        Some(text) if crate::keys::is_sealed(&text) => {
            let key = crate::keys::data_key(dir)?.with_context(|| {
                format!(
                    "{} is encrypted but this data directory has no data key ({})",
                    path.display(),
                    crate::keys::KEY_FILE
                )
            })?;
            let opened =
                crate::keys::open_sealed(key.as_bytes(), &text).ok_or_else(|| damaged(path))?;
            Ok(Some(String::from_utf8(opened).map_err(|_| damaged(path))?))
        }
        other => Ok(other),
    }
}

/// The owner key of a data directory, if this device holds it.
pub fn read_owner(dir: &Path) -> Result<Option<OwnerKey>> {
    let path = dir.join(OWNER_FILE);
    let text = read_secret_text(dir, &path)?;
    match text {
        None => Ok(None),
        Some(text) => hex::decode(&text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(|seed| Some(OwnerKey::from_seed(seed)))
            .ok_or_else(|| damaged(&path)),
    }
}

fn read_legacy_secret(dir: &Path) -> Result<Option<MeshSecret>> {
    let path = dir.join(LEGACY_SECRET_FILE);
    match read_secret_text(dir, &path)? {
        None => Ok(None),
        Some(text) => hex::decode(&text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(|b| Some(MeshSecret::from_bytes(b)))
            .ok_or_else(|| damaged(&path)),
    }
}

/// Writes what makes a directory a member: the root, the certificate and, for admin
/// devices, the owner key.
pub fn write_membership(
    dir: &Path,
    root: &MeshRoot,
    cert: &SignedCert,
    owner: Option<&OwnerKey>,
) -> Result<()> {
    crate::server::create_data_dir(dir)?;
    if let Some(owner) = owner {
        write_owner(dir, owner)?;
    }
    write_secret_file(&dir.join(CERT_FILE), &cert.to_text())?;
    write_secret_file(&dir.join(ROOT_FILE), &hex::encode(root.to_bytes()))?;
    match std::fs::remove_file(dir.join(JOINING_FILE)) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(anyhow!("cannot finish joining: {err}")),
    }
}

/// A default name for this device.
pub fn default_name(peer_id: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    let short = &peer_id[peer_id.len().saturating_sub(6)..];
    match host {
        Some(host) => format!("{host} ({short})"),
        None => format!("device {short}"),
    }
}

/// Loads this device's trust from `dir`. A directory that belongs to no mesh founds a
/// new one (this device its first admin); one of the shared-secret format is upgraded:
/// its owner key is derived from the shared secret, so every device of that mesh
/// arrives in the same mesh on its own.
pub fn load_or_found(dir: &Path, peer_id: &str) -> Result<(Trust, Founding)> {
    let founding = match read_root(dir)? {
        Some(_) => Founding::Member,
        None if dir.join(JOINING_FILE).exists() => bail!(
            "this device was being joined to a mesh, and the join did not complete; ask an admin for a new invite and run `medmesh init --data {} --join INVITE`",
            dir.display()
        ),
        None => {
            let (owner, founding) = match read_legacy_secret(dir)? {
                Some(secret) => (secret.owner_key(), Founding::Upgraded),
                None => (OwnerKey::from_seed(rand::random()), Founding::Founded),
            };
            let cert = owner.issue(DeviceCert::new(
                peer_id,
                &default_name(peer_id),
                DeviceKind::Admin,
                now_ms(),
            ))?;
            write_membership(dir, &owner.root(), &cert, Some(&owner))?;
            founding
        }
    };
    Ok((load(dir, Some(peer_id))?, founding))
}

/// Loads this device's trust from a directory that belongs to a mesh; `peer_id`, when
/// given, must be the certificate's (the node's own identity).
pub fn load(dir: &Path, peer_id: Option<&str>) -> Result<Trust> {
    let root = read_root(dir)?.ok_or_else(|| {
        anyhow!(
            "{} belongs to no mesh yet; create one with `medmesh init --data {}` or join one with an invite",
            dir.display(),
            dir.display()
        )
    })?;
    let cert_path = dir.join(CERT_FILE);
    let cert = match read_text(&cert_path)? {
        Some(text) => SignedCert::from_text(&text).map_err(|_| damaged(&cert_path))?,
        None => bail!(
            "this device has not been admitted to its mesh yet ({} is missing); ask an admin for a new invite and run `medmesh init --data {} --join INVITE`",
            cert_path.display(),
            dir.display()
        ),
    };
    let device = root
        .open_cert(&cert)
        .map_err(|err| anyhow!("this device's certificate {}: {err}", cert_path.display()))?;
    if let Some(peer_id) = peer_id
        && device.peer_id != peer_id
    {
        bail!(
            "this device's certificate {} is for device {}, not for this one ({peer_id}); the data directory was copied from another device: join the mesh with a new invite instead",
            cert_path.display(),
            device.peer_id
        );
    }
    Ok(Trust {
        root,
        cert,
        device,
        owner: read_owner(dir)?,
        revoked: RevokedSet::default(),
    })
}

/// What an admin device keeps of an invite until it is used.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingInvite {
    expires_at: i64,
    kind: DeviceKind,
    name: Option<String>,
    clinics: Vec<String>,
    /// How long the certificate it gives is valid, if not for ever.
    #[serde(default)]
    cert_valid_ms: Option<u64>,
    /// The device that used it.
    #[serde(default)]
    used_by: Option<String>,
}

/// Used invites are kept this long (a late attempt is told "already used"), expired
/// ones this long after they expired (told "expired"); then they are removed.
const KEEP_USED: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
const KEEP_EXPIRED_MS: i64 = 7 * 86_400 * 1000;

/// Removes invites used or expired long ago.
fn prune_invites(invites: &Path, now: i64) {
    let Ok(entries) = std::fs::read_dir(invites) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if name.ends_with(".used") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > KEEP_USED)
        } else {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<PendingInvite>(&text).ok())
                .is_some_and(|p| p.expires_at.saturating_add(KEEP_EXPIRED_MS) < now)
        };
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// What `medmesh invite` asks for.
#[derive(Debug, Clone)]
pub struct InviteOptions {
    /// How long it may be used.
    pub valid_for: std::time::Duration,
    /// What the device will be.
    pub kind: DeviceKind,
    /// Its name (else the one the device asks for).
    pub name: Option<String>,
    /// The clinics it serves.
    pub clinics: Vec<String>,
    /// When its certificate expires, if ever.
    pub cert_valid_for: Option<std::time::Duration>,
}

/// Makes an invite on an admin device: keeps its token's hash in `dir/invites`.
pub fn make_invite(
    dir: &Path,
    trust: &Trust,
    inviter: &str,
    addrs: Vec<String>,
    options: &InviteOptions,
) -> Result<Invite> {
    trust.owner().context("cannot make an invite")?;
    let token: [u8; 32] = rand::random();
    let expires_at = now_ms().saturating_add(options.valid_for.as_millis() as i64);
    let invites = invites_dir(dir);
    std::fs::create_dir_all(&invites)
        .with_context(|| format!("cannot create {}", invites.display()))?;
    prune_invites(&invites, now_ms());
    let pending = PendingInvite {
        expires_at,
        kind: options.kind,
        name: options.name.clone(),
        clinics: options.clinics.clone(),
        cert_valid_ms: options.cert_valid_for.map(|d| d.as_millis() as u64),
        used_by: None,
    };
    write_secret_file(
        &invites.join(token_hash(&token)),
        &serde_json::to_string(&pending)?,
    )?;
    Ok(Invite {
        root: serde_bytes::ByteBuf::from(trust.root.to_bytes().to_vec()),
        token: serde_bytes::ByteBuf::from(token.to_vec()),
        inviter: inviter.to_owned(),
        addrs,
        expires_at,
    })
}

/// Redeems an invite's token for `peer` (the peer id the transport authenticated):
/// answers its certificate, or why not. Only one caller can redeem a token.
pub fn redeem(
    dir: &Path,
    trust: &Trust,
    token: &[u8],
    peer: &str,
    asked_name: &str,
) -> EnrollAnswer {
    match try_redeem(dir, trust, token, peer, asked_name) {
        Ok(answer) => answer,
        Err(err) => {
            tracing::warn!(peer, error = %format!("{err:#}"), "an invite could not be redeemed");
            EnrollAnswer::Refused {
                reason: format!("the inviting device could not admit this one: {err:#}"),
            }
        }
    }
}

fn try_redeem(
    dir: &Path,
    trust: &Trust,
    token: &[u8],
    peer: &str,
    asked_name: &str,
) -> Result<EnrollAnswer> {
    let refused = |reason: &str| {
        Ok(EnrollAnswer::Refused {
            reason: reason.to_owned(),
        })
    };
    let Some(owner) = &trust.owner else {
        return refused(
            "the device that made this invite is no longer an admin device; ask for a new invite",
        );
    };
    if token.len() != 32 {
        return refused("this invite is damaged; ask for a new one");
    }
    let invites = invites_dir(dir);
    let hash = token_hash(token);
    let pending_path = invites.join(&hash);
    let used_path = invites.join(format!("{hash}.used"));
    let read_used = || -> Result<PendingInvite> {
        let text = std::fs::read_to_string(&used_path)
            .with_context(|| format!("cannot read {}", used_path.display()))?;
        serde_json::from_str(&text).context("the kept invite is damaged")
    };
    // The rename is the single use: of two devices racing for one invite, one rename
    // succeeds and the other finds nothing. The winner is noted in the used invite, so
    // that the same device asking again (its answer was lost with the connection) gets
    // its certificate again rather than being locked out.
    let pending = match std::fs::rename(&pending_path, &used_path) {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(&invites) {
                let _ = d.sync_all();
            }
            let mut pending = read_used()?;
            pending.used_by = Some(peer.to_owned());
            write_secret_file(&used_path, &serde_json::to_string(&pending)?)?;
            pending
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if !used_path.exists() {
                return refused(
                    "this invite is unknown to the device that made it (made for another mesh, or withdrawn); ask for a new one",
                );
            }
            match read_used() {
                Ok(pending) if pending.used_by.as_deref() == Some(peer) => pending,
                _ => {
                    return refused(
                        "this invite has already been used; an invite admits one device: ask for a new one",
                    );
                }
            }
        }
        Err(err) => return Err(anyhow!("cannot mark the invite used: {err}")),
    };
    let now = now_ms();
    if pending.expires_at <= now {
        return refused("this invite has expired; ask for a new one");
    }
    let name = pending
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| asked_name.chars().take(80).collect());
    let mut cert = DeviceCert::new(peer, &name, pending.kind, now);
    cert.clinics = pending.clinics;
    cert.expires_at = pending
        .cert_valid_ms
        .map(|ms| now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)));
    let cert = owner.issue(cert)?;
    tracing::info!(
        peer,
        name,
        kind = pending.kind.as_str(),
        "a device joined the mesh with an invite"
    );
    Ok(EnrollAnswer::Admitted {
        cert,
        owner_key: (pending.kind == DeviceKind::Admin)
            .then(|| serde_bytes::ByteBuf::from(owner.seed().to_vec())),
    })
}

/// Reads a duration like `24h`, `30m`, `7d`, `90s`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow!("`{text}` is not a duration; write it like 24h, 30m, 7d or 90s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" | "" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => bail!("`{text}` is not a duration; write it like 24h, 30m, 7d or 90s"),
    };
    if secs == 0 {
        bail!("a duration of zero admits nobody; write it like 24h");
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn author(peer: &str) -> ChangeAuthor {
    ChangeAuthor {
        device: peer.to_owned(),
        user: None,
    }
}

fn as_fields(value: Value) -> Fields {
    match value {
        Value::Object(map) => map,
        _ => Fields::new(),
    }
}

fn upsert(store: &Store, collection: &str, id: DocId, fields: Fields, peer: &str) -> Result<()> {
    let kind = match store.get(collection, &id) {
        Ok(view) => {
            if !view.deleted && fields.iter().all(|(k, v)| view.record.get(k) == Some(v)) {
                return Ok(());
            }
            WriteKind::Patch(fields)
        }
        Err(StoreError::NotFound { .. }) => {
            let mut fields = fields;
            fields.insert("id".into(), Value::from(id.to_string()));
            WriteKind::Create(fields)
        }
        Err(err) => return Err(err.into()),
    };
    store
        .write_blocking(WriteBatch::one(WriteOp::new(
            collection,
            Some(id),
            kind,
            author(peer),
        )))?
        .into_iter()
        .next()
        .transpose()?;
    Ok(())
}

/// Publishes this device's certificate in the replicated device list (when it changed).
pub fn publish_self(store: &Store, trust: &Trust) -> Result<()> {
    let d = &trust.device;
    let fields = as_fields(json!({
        "peer_id": d.peer_id,
        "name": d.name,
        "kind": d.kind.as_str(),
        "certificate": trust.cert.to_text(),
    }));
    upsert(
        store,
        DEVICES_COLLECTION,
        DocId::derived("device", &[&d.peer_id]),
        fields,
        &d.peer_id,
    )
}

/// A certificate for this device in the replicated device list newer than the one it
/// holds (an admin changed its clinics), checked: the owner's signature, this device's
/// peer id. `None` when there is none.
pub fn newer_own_cert(store: &Store, trust: &Trust) -> Result<Option<(SignedCert, DeviceCert)>> {
    let id = DocId::derived("device", &[&trust.device.peer_id]);
    let record = match store.get(DEVICES_COLLECTION, &id) {
        Ok(view) => view.record,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let Some(cert) = record
        .get("certificate")
        .and_then(Value::as_str)
        .and_then(|t| SignedCert::from_text(t).ok())
    else {
        return Ok(None);
    };
    match trust.root.open_cert(&cert) {
        Ok(device)
            if device.peer_id == trust.device.peer_id
                && device.issued_at > trust.device.issued_at =>
        {
            Ok(Some((cert, device)))
        }
        _ => Ok(None),
    }
}

/// Takes a newer certificate of this device as its own: written to `device.cert` in
/// `dir`, and into `trust`.
pub fn adopt_cert(
    dir: &Path,
    trust: &mut Trust,
    cert: SignedCert,
    device: DeviceCert,
) -> Result<()> {
    write_secret_file(&dir.join(CERT_FILE), &cert.to_text())?;
    trust.cert = cert;
    trust.device = device;
    Ok(())
}

/// Gives the device `peer` a new certificate that serves `clinics` (empty: all), the
/// rest as before (admin devices). It reaches the device through the replicated device
/// list; the device then holds only those clinics' records. Answers the new certificate.
pub fn set_clinics(
    store: &Store,
    trust: &Trust,
    peer: &str,
    clinics: Vec<String>,
) -> Result<DeviceCert> {
    let owner = trust.owner().context("cannot change a device's clinics")?;
    let id = DocId::derived("device", &[peer]);
    let current = match store.get(DEVICES_COLLECTION, &id) {
        Ok(view) => view
            .record
            .get("certificate")
            .and_then(Value::as_str)
            .and_then(|t| SignedCert::from_text(t).ok())
            .and_then(|c| trust.root.open_cert(&c).ok()),
        Err(StoreError::NotFound { .. }) => None,
        Err(err) => return Err(err.into()),
    };
    let Some(mut device) = current.filter(|d| d.peer_id == peer) else {
        bail!(
            "no device {peer} is in the mesh's device list; `medmesh devices` lists them (a device is listed once it has synced)"
        );
    };
    let mut clinics = clinics;
    clinics.sort();
    clinics.dedup();
    device.clinics = clinics;
    // Newer than any certificate it had, even if this machine's clock is behind.
    device.issued_at = now_ms().max(device.issued_at + 1);
    let cert = owner.issue(device.clone())?;
    let fields = as_fields(json!({
        "peer_id": device.peer_id,
        "name": device.name,
        "kind": device.kind.as_str(),
        "certificate": cert.to_text(),
    }));
    upsert(store, DEVICES_COLLECTION, id, fields, &trust.device.peer_id)?;
    tracing::info!(peer, clinics = ?device.clinics, "a device's clinics were changed");
    Ok(device)
}

/// Signs and writes the revocation of `peer` (admin devices). Answers the revocation.
pub fn revoke(store: &Store, trust: &Trust, peer: &str, reason: &str) -> Result<SignedRevocation> {
    let owner = trust.owner().context("cannot revoke a device")?;
    if peer == trust.device.peer_id {
        bail!("a device cannot revoke itself; revoke it from another admin device");
    }
    let revocation = owner.revoke(peer, reason, now_ms())?;
    let fields = as_fields(json!({
        "peer_id": peer,
        "reason": reason,
        "revocation": revocation.to_text(),
    }));
    upsert(
        store,
        REVOCATIONS_COLLECTION,
        DocId::derived("revocation", &[peer]),
        fields,
        &trust.device.peer_id,
    )?;
    Ok(revocation)
}

/// The revoked peer id a revocation record proves, if its signature is the owner's.
fn revoked_by_record(root: &MeshRoot, record: &Fields) -> Option<(String, String, i64)> {
    let text = record.get("revocation")?.as_str()?;
    let signed = SignedRevocation::from_text(text).ok()?;
    match root.open_revocation(&signed) {
        Ok(body) => Some((body.peer_id, body.reason, body.revoked_at)),
        Err(err) => {
            tracing::warn!(error = %err, "a revocation record is not signed by the mesh's owner; it is ignored");
            None
        }
    }
}

/// Who may have made the changes peers send, for the store: any device of the mesh,
/// except that a revoked device's changes dated after its revocation are refused. (A
/// device's certificate may arrive after its changes, so an unknown signer is not refused;
/// history shows it as a device without a certificate here.)
#[derive(Debug, Clone, Default)]
pub struct ChangeAuthority {
    /// The node's revoked devices (the same set as [`Trust::revoked`]).
    pub revoked: RevokedSet,
    /// Peer ids of the keys seen, as text.
    names: Arc<Mutex<HashMap<[u8; 32], String>>>,
}

impl ChangeAuthority {
    fn peer_of(&self, key: &[u8; 32]) -> Result<String, String> {
        if let Ok(names) = self.names.lock()
            && let Some(name) = names.get(key)
        {
            return Ok(name.clone());
        }
        let name =
            peer_of_key(key).ok_or_else(|| "it names a device key that is not valid".to_owned())?;
        if let Ok(mut names) = self.names.lock()
            && names.len() < 4096
        {
            names.insert(*key, name.clone());
        }
        Ok(name)
    }
}

impl Authority for ChangeAuthority {
    fn check_signer(&self, signer: &[u8; 32], time_ms: i64) -> Result<(), String> {
        if self.revoked.is_empty() {
            return Ok(());
        }
        let peer = self.peer_of(signer)?;
        match self.revoked.revoked_at(&peer) {
            Some(at) if time_ms >= at => Err(format!(
                "it was made by device {peer} after that device was revoked; ask an admin whether this device should be trusted again"
            )),
            _ => Ok(()),
        }
    }
}

/// The peer id (as text) of a device's Ed25519 public key.
pub fn peer_of_key(key: &[u8; 32]) -> Option<String> {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(
        libp2p::identity::PublicKey::from(public)
            .to_peer_id()
            .to_string(),
    )
}

/// Reads every revocation the store holds into `revoked`; answers the peers newly revoked.
pub fn load_revocations(
    store: &Store,
    root: &MeshRoot,
    revoked: &RevokedSet,
) -> Result<Vec<String>> {
    new_revocations(store, root, revoked, &mut HashSet::new())
}

/// The peers newly revoked by records not in `seen` (their texts, each verified once).
fn new_revocations(
    store: &Store,
    root: &MeshRoot,
    revoked: &RevokedSet,
    seen: &mut HashSet<String>,
) -> Result<Vec<String>> {
    let mut new = Vec::new();
    for record in list_all(store, REVOCATIONS_COLLECTION)? {
        let Some(text) = record.get("revocation").and_then(Value::as_str) else {
            continue;
        };
        if !seen.insert(text.to_owned()) {
            continue;
        }
        if let Some((peer, _, at)) = revoked_by_record(root, &record)
            && revoked.insert(&peer, at)
        {
            new.push(peer);
        }
    }
    Ok(new)
}

/// Every record of a (small) collection, deleted ones included.
fn list_all(store: &Store, collection: &str) -> Result<Vec<Fields>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list(&Query {
            collection: collection.to_owned(),
            limit: 500,
            cursor: cursor.take(),
            include_deleted: true,
            ..Query::default()
        })?;
        out.extend(page.records.into_iter().map(|v| v.record));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(out)
}

/// One device of the mesh, as `GET /v1/devices` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    /// Its peer id.
    pub peer_id: String,
    /// Its name.
    pub name: String,
    /// tablet, gateway or admin.
    pub kind: String,
    /// The clinics it serves (none: all).
    pub clinics: Vec<String>,
    /// When it was admitted (RFC 3339).
    pub issued_at: String,
    /// When its certificate expires (RFC 3339), if ever.
    pub expires_at: Option<String>,
    /// Revoked, and why.
    pub revoked: Option<String>,
    /// This device.
    pub this_device: bool,
}

/// Every device with a valid certificate in the replicated list, and every revoked one.
pub fn devices(store: &Store, trust: &Trust) -> Result<Vec<DeviceView>> {
    let revocations: std::collections::HashMap<String, String> =
        list_all(store, REVOCATIONS_COLLECTION)?
            .iter()
            .filter_map(|r| revoked_by_record(&trust.root, r))
            .map(|(peer, reason, at)| {
                let when = record::format_timestamp(at);
                let why = if reason.is_empty() {
                    format!("revoked {when}")
                } else {
                    format!("revoked {when}: {reason}")
                };
                (peer, why)
            })
            .collect();
    let mut out = Vec::new();
    for record in list_all(store, DEVICES_COLLECTION)? {
        let Some(cert) = record
            .get("certificate")
            .and_then(Value::as_str)
            .and_then(|t| SignedCert::from_text(t).ok())
        else {
            continue;
        };
        let Ok(d) = trust.root.open_cert(&cert) else {
            tracing::warn!(
                "a device record's certificate is not signed by the mesh's owner; it is not listed"
            );
            continue;
        };
        out.push(DeviceView {
            revoked: revocations.get(&d.peer_id).cloned(),
            this_device: d.peer_id == trust.device.peer_id,
            peer_id: d.peer_id,
            name: d.name,
            kind: d.kind.as_str().to_owned(),
            clinics: d.clinics,
            issued_at: record::format_timestamp(d.issued_at),
            expires_at: d.expires_at.map(record::format_timestamp),
        });
    }
    for (peer, why) in &revocations {
        if !out.iter().any(|d| &d.peer_id == peer) {
            out.push(DeviceView {
                peer_id: peer.clone(),
                name: String::new(),
                kind: String::new(),
                clinics: Vec::new(),
                issued_at: String::new(),
                expires_at: None,
                revoked: Some(why.clone()),
                this_device: false,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
    Ok(out)
}

/// How often, at most, the watcher looks at the revocations while changes arrive.
const REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches the store for revocations (from any peer or this node) and sends each newly
/// revoked peer id to `revoked_tx`, until `shutdown`, or the store or the receiver
/// closes. Changes come in bursts (a sync stores thousands a second), so it looks at the
/// (small) revocations collection at most every [`REVOCATION_CHECK`], not at every change.
pub async fn watch_revocations(
    store: Store,
    trust: Trust,
    revoked_tx: tokio::sync::mpsc::Sender<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut feed = store.subscribe_feed();
    let mut seen = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = feed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REVOCATION_CHECK) => {}
        }
        feed.borrow_and_update();
        let store_c = store.clone();
        let root = trust.root;
        let revoked = trust.revoked.clone();
        let mut seen_c = std::mem::take(&mut seen);
        let step = tokio::task::spawn_blocking(move || {
            let new = new_revocations(&store_c, &root, &revoked, &mut seen_c);
            (seen_c, new)
        })
        .await;
        let Ok((kept, new)) = step else {
            return;
        };
        seen = kept;
        match new {
            Ok(new) => {
                for peer in new {
                    tracing::warn!(
                        peer,
                        "a device was revoked: disconnecting it and refusing it from now on"
                    );
                    if revoked_tx.send(peer).await.is_err() {
                        return;
                    }
                }
            }
            Err(err) => tracing::warn!(
                error = %format!("{err:#}"),
                "reading the revocations failed; trying again at the next change"
            ),
        }
    }
}

/// The path of a data directory's pending invites.
fn invites_dir(dir: &Path) -> PathBuf {
    dir.join(INVITES_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(dir: &Path) -> Trust {
        let (trust, founding) = load_or_found(dir, "12D3KooWAdmin").expect("found");
        assert_eq!(founding, Founding::Founded);
        trust
    }

    /// A tablet invite for clinic-1, valid for `valid_for`, its certificate for an hour.
    fn invite_for(dir: &Path, trust: &Trust, valid_for: std::time::Duration) -> Result<Invite> {
        let options = InviteOptions {
            valid_for,
            kind: DeviceKind::Tablet,
            name: None,
            clinics: vec!["clinic-1".into()],
            cert_valid_for: Some(std::time::Duration::from_secs(3600)),
        };
        make_invite(dir, trust, "12D3KooWAdmin", vec![], &options)
    }

    #[test]
    fn an_invite_is_redeemed_once_and_its_certificate_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trust = admin(dir.path());
        let invite =
            invite_for(dir.path(), &trust, std::time::Duration::from_secs(60)).expect("invite");
        let EnrollAnswer::Admitted { cert, owner_key } =
            redeem(dir.path(), &trust, &invite.token, "12D3KooWTablet", "tab")
        else {
            panic!("the first use is admitted");
        };
        assert!(owner_key.is_none(), "a tablet gets no owner key");
        let body = trust
            .root
            .check_cert(&cert, "12D3KooWTablet", now_ms(), |_| false)
            .expect("valid");
        assert_eq!(body.name, "tab");
        assert_eq!(body.clinics, vec!["clinic-1".to_owned()]);
        assert!(body.expires_at.is_some());
        let repeat = redeem(dir.path(), &trust, &invite.token, "12D3KooWTablet", "tab");
        assert!(
            matches!(repeat, EnrollAnswer::Admitted { .. }),
            "the same device asking again (its answer lost) is admitted again"
        );
        let again = redeem(dir.path(), &trust, &invite.token, "12D3KooWOther", "x");
        assert!(
            matches!(&again, EnrollAnswer::Refused { reason } if reason.contains("already been used")),
            "{again:?}"
        );
        let unknown = redeem(dir.path(), &trust, &[9; 32], "12D3KooWOther", "x");
        assert!(
            matches!(&unknown, EnrollAnswer::Refused { reason } if reason.contains("unknown")),
            "{unknown:?}"
        );
    }

    #[test]
    fn expired_invites_are_refused_and_pruned_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trust = admin(dir.path());
        let invite =
            invite_for(dir.path(), &trust, std::time::Duration::from_millis(1)).expect("invite");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let answer = redeem(dir.path(), &trust, &invite.token, "12D3KooWTablet", "t");
        assert!(
            matches!(&answer, EnrollAnswer::Refused { reason } if reason.contains("expired")),
            "{answer:?}"
        );
        let pending =
            invite_for(dir.path(), &trust, std::time::Duration::from_secs(60)).expect("invite");
        let invites = invites_dir(dir.path());
        prune_invites(&invites, now_ms() + KEEP_EXPIRED_MS * 2 + 60_000);
        assert!(
            !invites.join(pending.token_hash()).exists(),
            "expired long ago: removed"
        );
        assert!(
            invites
                .join(format!("{}.used", invite.token_hash()))
                .exists(),
            "a used invite stays a month"
        );
    }

    #[test]
    fn a_non_admin_device_cannot_invite_or_revoke() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut trust = admin(dir.path());
        trust.owner = None;
        let err = invite_for(dir.path(), &trust, std::time::Duration::from_secs(60))
            .expect_err("refused");
        assert!(format!("{err:#}").contains("not an admin device"));
        let store = Store::memory(medmesh_protocol::Schema::hikma()).expect("store");
        let err = revoke(&store, &trust, "12D3KooWOther", "x").expect_err("refused");
        assert!(format!("{err:#}").contains("not an admin device"));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(
            parse_duration("24h").expect("h"),
            std::time::Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_duration("30m").expect("m"),
            std::time::Duration::from_secs(1800)
        );
        assert_eq!(
            parse_duration("7d").expect("d"),
            std::time::Duration::from_secs(604_800)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
