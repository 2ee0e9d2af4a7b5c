//! The users who sign in to the Hikma app: the replicated `users` collection, whose
//! `hashed_password` is bcrypt as the Hikma cloud stores it, so a user's cloud password
//! works on every node of the mesh.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use medmesh_protocol::record::Fields;
use medmesh_storage::{Filter, Query, Store};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A successful sign-in is remembered this long (bcrypt is slow on purpose; the app
/// sends its credentials with every request).
const REMEMBERED: Duration = Duration::from_secs(600);
/// Sign-ins remembered at most.
const REMEMBERED_MAX: usize = 1024;

/// Checks credentials against the `users` collection.
pub struct Users {
    store: Store,
    /// (email, digest of the stored hash and the password) → when it was checked.
    checked: Mutex<HashMap<(String, [u8; 32]), Instant>>,
}

impl Users {
    /// Users of this store.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            checked: Mutex::new(HashMap::new()),
        }
    }

    /// The live user with this email (compared without case), if any.
    pub fn find(&self, email: &str) -> Result<Option<Fields>> {
        let email = email.trim();
        let same = |r: &Fields| {
            r.get("email")
                .and_then(Value::as_str)
                .is_some_and(|e| e.trim().eq_ignore_ascii_case(email))
        };
        // The index first (emails as written); then every user, for another spelling.
        let exact = self.store.list(&Query {
            collection: "users".into(),
            filters: vec![Filter::Equals {
                field: "email".into(),
                value: email.to_owned(),
            }],
            limit: 16,
            ..Query::default()
        })?;
        if let Some(user) = exact.records.into_iter().map(|v| v.record).find(same) {
            return Ok(Some(user));
        }
        let mut cursor = None;
        loop {
            let page = self.store.list(&Query {
                collection: "users".into(),
                limit: 1000,
                cursor,
                ..Query::default()
            })?;
            if let Some(user) = page.records.into_iter().map(|v| v.record).find(same) {
                return Ok(Some(user));
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(None),
            }
        }
    }

    /// The user these credentials belong to, or `None` (unknown email, wrong password,
    /// no password set). Runs bcrypt: call it off the async threads.
    pub fn authenticate(&self, email: &str, password: &str) -> Result<Option<Fields>> {
        let Some(user) = self.find(email)? else {
            return Ok(None);
        };
        if crate::access::is_disabled(&user) {
            return Ok(None);
        }
        let Some(hash) = user.get("hashed_password").and_then(Value::as_str) else {
            return Ok(None);
        };
        let mut digest = Sha256::new();
        digest.update(hash.as_bytes());
        digest.update([0]);
        digest.update(password.as_bytes());
        let key = (email.trim().to_ascii_lowercase(), digest.finalize().into());
        if let Ok(checked) = self.checked.lock()
            && let Some(at) = checked.get(&key)
            && at.elapsed() < REMEMBERED
        {
            return Ok(Some(user));
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return Ok(None);
        }
        if let Ok(mut checked) = self.checked.lock() {
            checked.retain(|_, at| at.elapsed() < REMEMBERED);
            if checked.len() >= REMEMBERED_MAX {
                checked.clear();
            }
            checked.insert(key, Instant::now());
        }
        Ok(Some(user))
    }
}

/// A bcrypt hash of `password`, as the Hikma cloud stores them.
pub fn hash_password(password: &str) -> Result<String> {
    Ok(bcrypt::hash(password, bcrypt::DEFAULT_COST)?)
}

/// The `user_clinic_permissions` flags the Hikma cloud gives a new user of `role` at
/// their clinic (a pharmacist, medmesh's own role, dispenses).
pub fn default_permissions(role: &str) -> Value {
    use crate::access::roles::Flag;
    let role = crate::access::Role::parse(role).unwrap_or(crate::access::Role::Registrar);
    let mut row = serde_json::Map::new();
    for flag in [
        Flag::RegisterPatients,
        Flag::ViewHistory,
        Flag::EditRecords,
        Flag::DeleteRecords,
        Flag::PrescribeMedications,
        Flag::DispenseMedications,
        Flag::DeletePatientRecords,
        Flag::ClinicAdmin,
    ] {
        row.insert(flag.column().into(), Value::Bool(role.default_flag(flag)));
    }
    for column in [
        "can_edit_other_provider_event",
        "can_download_patient_reports",
        "can_delete_patient_visits",
    ] {
        let admin = matches!(
            role,
            crate::access::Role::Admin | crate::access::Role::SuperAdmin
        );
        let provider_reports =
            role == crate::access::Role::Provider && column == "can_download_patient_reports";
        row.insert(column.into(), Value::Bool(admin || provider_reports));
    }
    Value::Object(row)
}

/// The user as the app is shown it: the password hash masked.
pub fn masked(mut user: Fields) -> Fields {
    if user.contains_key("hashed_password") {
        user.insert("hashed_password".into(), Value::from("************"));
    }
    user
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_protocol::{ChangeAuthor, Schema};
    use medmesh_storage::{WriteBatch, WriteKind, WriteOp};
    use serde_json::json;

    #[test]
    fn a_bcrypt_password_signs_in_and_a_wrong_one_does_not() {
        let store = Store::memory(Schema::hikma()).expect("store");
        // A hash made by another bcrypt implementation ($2a$, cost 4): "hikma-pass".
        let foreign = bcrypt::hash_with_result("hikma-pass", 4)
            .expect("hash")
            .format_for_version(bcrypt::Version::TwoA);
        let fields = json!({"email": "Nurse@Clinic.org", "name": "Amina", "role": "provider",
                            "hashed_password": foreign});
        let Value::Object(fields) = fields else {
            unreachable!()
        };
        store
            .write_blocking(WriteBatch::one(WriteOp::new(
                "users",
                None,
                WriteKind::Create(fields),
                ChangeAuthor::default(),
            )))
            .expect("write");
        let users = Users::new(store);
        let found = users
            .authenticate("nurse@clinic.org", "hikma-pass")
            .expect("check");
        assert_eq!(
            found.and_then(|u| u.get("name").cloned()),
            Some(json!("Amina"))
        );
        // Remembered, and still refused with the wrong password.
        assert!(
            users
                .authenticate("nurse@clinic.org", "hikma-pass")
                .expect("check")
                .is_some()
        );
        assert!(
            users
                .authenticate("nurse@clinic.org", "wrong")
                .expect("check")
                .is_none()
        );
        assert!(
            users
                .authenticate("nobody@clinic.org", "hikma-pass")
                .expect("check")
                .is_none()
        );
        assert_eq!(
            masked(users.find("nurse@clinic.org").expect("find").expect("user"))["hashed_password"],
            json!("************")
        );
    }
}
