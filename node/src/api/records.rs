//! Record endpoints: create, read, list, patch, replace, delete, history, conflicts,
//! import.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use medmesh_protocol::DocId;
use medmesh_protocol::record::{self, Fields};
use medmesh_protocol::schema::counter_fields;
use medmesh_storage::{Filter, Query, WriteBatch, WriteKind, WriteOp, choice_as_fields};
use serde_json::{Value, json};

use super::{
    ApiError, AppState, DEFAULT_PAGE, MAX_IMPORT_RECORDS, MAX_PAGE, MAX_RECORD_BODY, blocking,
};
use crate::access::log::Entry;
use crate::access::roles::{Access, is_patient_record, needed};
use crate::access::{Caller, Permission, Role};

/// The clinic a record belongs to, as its own fields name it.
pub(crate) fn clinic_of(fields: &Fields) -> Option<&str> {
    ["clinic_id", "primary_clinic_id"]
        .iter()
        .find_map(|name| fields.get(*name).and_then(Value::as_str))
}

/// The patient a record is of.
fn patient_of(collection: &str, fields: &Fields) -> Option<String> {
    let name = if collection == "patients" {
        "id"
    } else {
        "patient_id"
    };
    fields.get(name).and_then(Value::as_str).map(str::to_owned)
}

/// Whether the caller's role makes clinic flags matter (so the record's clinic must be
/// read before a change).
fn flags_matter(caller: &Caller) -> bool {
    !matches!(caller.role, Role::SuperAdmin | Role::Device)
}

/// Only a super admin makes or changes an admin or a super admin (the Hikma cloud lets
/// only a super admin make one; an admin of one clinic must not make an admin who, with
/// no clinic rows, would manage others).
fn check_super_admin(
    caller: &Caller,
    collection: &str,
    fields: &[&Fields],
) -> Result<(), ApiError> {
    let touches = collection == "users"
        && fields.iter().any(|f| {
            f.get("role").and_then(Value::as_str).is_some_and(|r| {
                let r = r.trim();
                r.eq_ignore_ascii_case("super_admin") || r.eq_ignore_ascii_case("admin")
            })
        });
    if touches && flags_matter(caller) {
        let mut error = ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "only a super_admin may make or change an admin or a super_admin (the permission `manage_users` at the level of super_admin), and {} is {}",
                caller.name, caller.role
            ),
        );
        error.permission = Some(Permission::ManageUsers.name());
        return Err(error);
    }
    Ok(())
}

/// A user's email must name one user only (compared without case): two users of one
/// email would sign in as each other, or lock each other out.
fn unique_email(state: &AppState, fields: &Fields, this: Option<&str>) -> Result<(), ApiError> {
    let Some(email) = fields.get("email").and_then(Value::as_str) else {
        return Ok(());
    };
    let found = state.users().find(email).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the users could not be read: {e:#}"),
        )
    })?;
    match found
        .as_ref()
        .and_then(|u| u.get("id"))
        .and_then(Value::as_str)
    {
        Some(other) if Some(other) != this => {
            let mut error = ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("another user already has the email {email}; each user needs their own"),
            );
            error.field = Some("email".into());
            Err(error)
        }
        _ => Ok(()),
    }
}

/// Logs a read of patients' records.
async fn log_read(
    state: &AppState,
    caller: &Caller,
    action: &'static str,
    collection: &str,
    record: Option<&Fields>,
    count: Option<usize>,
    patient: Option<String>,
) {
    if !is_patient_record(collection) {
        return;
    }
    state
        .access_log()
        .record(Entry {
            caller: caller.clone(),
            action,
            collection: collection.to_owned(),
            record_id: record
                .and_then(|r| r.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            patient_id: record.and_then(|r| patient_of(collection, r)).or(patient),
            count,
        })
        .await;
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body is too large (a record may be at most {} KiB; import many records with `medmesh import`)",
                    MAX_RECORD_BODY / 1024
                ),
            )
        } else {
            ApiError::bad_request("bad_body", format!("the request body could not be read: {rejection}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "bad_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

pub(crate) fn body_object(body: Result<Bytes, BytesRejection>) -> Result<Fields, ApiError> {
    match body_json(body)? {
        Value::Object(fields) => Ok(fields),
        other => Err(ApiError::bad_request(
            "bad_json",
            format!(
                "the body must be a JSON object (one record), not {}",
                kind_of(&other)
            ),
        )),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_id(id: &str) -> Result<DocId, ApiError> {
    id.parse::<DocId>()
        .map_err(|e| ApiError::bad_request("bad_id", e.to_string()))
}

fn check_collection(state: &AppState, collection: &str) -> Result<(), ApiError> {
    if state.store().schema().collection(collection).is_some() {
        Ok(())
    } else {
        Err(medmesh_storage::StoreError::UnknownCollection(collection.to_owned()).into())
    }
}

/// What a generic record endpoint is asked to do (for [`refuse_managed`]).
enum GenericWrite {
    Create,
    Patch(Fields),
    Replace(Fields),
    Delete,
}

impl GenericWrite {
    fn of(kind: &WriteKind) -> Self {
        match kind {
            WriteKind::Patch(fields) => Self::Patch(fields.clone()),
            WriteKind::Choose { path, value } => Self::Patch(choice_as_fields(path, value)),
            WriteKind::Replace(fields) => Self::Replace(fields.clone()),
            WriteKind::Create(_) => Self::Create,
            _ => Self::Delete,
        }
    }
}

const PHARMACY_ENDPOINTS: &str = "POST /v1/pharmacy/restock, /v1/pharmacy/dispense, /v1/pharmacy/count or /v1/pharmacy/adjust (or `medmesh restock | dispense`)";

fn managed(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "managed_record", message)
}

/// Stock, its audit trail and the counters of prescription items keep their
/// invariants only if they change through the pharmacy operations: the generic record
/// endpoints refuse to write them, naming what to use instead.
fn refuse_managed(
    state: &AppState,
    collection: &str,
    id: Option<&DocId>,
    write: &GenericWrite,
) -> Result<(), ApiError> {
    if collection.starts_with('_') {
        return Err(managed(format!(
            "`{collection}` is kept by medmesh itself; declare collections with `medmesh start --schema FILE`"
        )));
    }
    match collection {
        "clinic_inventory" => Err(managed(format!(
            "stock items change only through the pharmacy, so that every movement is recorded and quantities add up across devices: use {PHARMACY_ENDPOINTS}"
        ))),
        "inventory_transactions" => Err(managed(format!(
            "stock movements are an audit trail written by the pharmacy operations and never changed: use {PHARMACY_ENDPOINTS}"
        ))),
        "prescription_items" => {
            let counters = counter_fields(collection);
            let fields = match write {
                GenericWrite::Patch(fields) | GenericWrite::Replace(fields) => fields,
                GenericWrite::Create | GenericWrite::Delete => return Ok(()),
            };
            let touched: Vec<&str> = counters
                .iter()
                .copied()
                .filter(|c| fields.contains_key(*c))
                .collect();
            if let GenericWrite::Patch(_) = write {
                if !touched.is_empty() {
                    return Err(managed(format!(
                        "`{}` of a prescription item changes only when it is dispensed: use POST /v1/pharmacy/dispense with its prescription_item_id",
                        touched.join("`, `")
                    )));
                }
                return Ok(());
            }
            // A PUT must carry the counters as they are (it would drop them otherwise).
            let current = match id {
                Some(id) => state.store().get(collection, id)?.record,
                None => return Ok(()),
            };
            for counter in counters {
                if fields.get(*counter) != current.get(*counter) {
                    return Err(managed(format!(
                        "a PUT of a prescription item must keep `{counter}` as it is ({}); it changes only when the item is dispensed (POST /v1/pharmacy/dispense). Use PATCH to change other fields",
                        current.get(*counter).cloned().unwrap_or(Value::Null)
                    )));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A written record as the API answers it: a user's password hash masked.
fn masked_if_user(collection: &str, record: Fields) -> Fields {
    if collection == "users" {
        crate::users::masked(record)
    } else {
        record
    }
}

/// A record as the API shows it: a stock item's `quantity_available` is its own counter
/// plus its ledgers'; a user's password hash is masked.
fn as_shown(state: &AppState, collection: &str, record: &mut Fields) -> Result<(), ApiError> {
    if collection == "users" {
        *record = masked_if_user(collection, std::mem::take(record));
        return Ok(());
    }
    if collection != "clinic_inventory" {
        return Ok(());
    }
    let id = record
        .get("id")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<DocId>().ok());
    if let Some(id) = id
        && let Some(quantity) = state.pharmacy().quantity(&id)?
    {
        record.insert(crate::pharmacy::QUANTITY.into(), Value::from(quantity));
    }
    Ok(())
}

async fn write_one(
    state: &AppState,
    op: WriteOp,
) -> Result<medmesh_storage::WriteOutcome, ApiError> {
    let mut outcomes = state.store().write(WriteBatch::one(op)).await?;
    match outcomes.pop() {
        Some(result) => Ok(result?),
        None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the store gave no answer for the write",
        )),
    }
}

/// `POST /v1/{collection}`
pub async fn create(
    State(state): State<AppState>,
    Path(collection): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_collection(&state, &collection)?;
    let fields = body_object(body)?;
    caller.require(needed(&collection, Access::Write), clinic_of(&fields))?;
    check_super_admin(&caller, &collection, &[&fields])?;
    refuse_managed(&state, &collection, None, &GenericWrite::Create)?;
    let mut fields = fields;
    if collection == "users" {
        let (s, f) = (state.clone(), fields.clone());
        blocking(move || unique_email(&s, &f, None)).await?;
        hash_given_password(&mut fields).await?;
    }
    let op = WriteOp::new(
        &collection,
        None,
        WriteKind::Create(fields),
        caller.author(state.peer_id()),
    );
    let outcome = write_one(&state, op).await?;
    if collection == "users" {
        default_clinic_permissions(&state, &caller, &outcome.record).await?;
    }
    let record = masked_if_user(&collection, outcome.record);
    Ok((StatusCode::CREATED, Json(Value::Object(record))))
}

/// A user's `password`, when a request gives one, becomes its bcrypt `hashed_password`:
/// the plain text is never stored.
async fn hash_given_password(fields: &mut Fields) -> Result<(), ApiError> {
    let Some(given) = fields.remove("password") else {
        return Ok(());
    };
    // bcrypt reads at most 72 bytes of a password.
    let password = given
        .as_str()
        .filter(|p| p.chars().count() >= 8 && p.len() <= 72)
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::invalid_field(
                "password",
                "the password must be text of 8 characters to 72 bytes",
            )
        })?;
    let hashed = blocking(move || {
        crate::users::hash_password(&password).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the password could not be hashed: {e:#}"),
            )
        })
    })
    .await?;
    fields.insert("hashed_password".into(), Value::from(hashed));
    Ok(())
}

/// What the Hikma cloud does for a new user with a clinic: a `user_clinic_permissions`
/// row with their role's defaults at that clinic (the app enforces it too).
async fn default_clinic_permissions(
    state: &AppState,
    caller: &Caller,
    user: &Fields,
) -> Result<(), ApiError> {
    let (Some(id), Some(clinic), Some(role)) = (
        user.get("id").and_then(Value::as_str),
        user.get("clinic_id").and_then(Value::as_str),
        user.get("role").and_then(Value::as_str),
    ) else {
        return Ok(());
    };
    let mut row = crate::users::default_permissions(role);
    row["user_id"] = Value::from(id);
    row["clinic_id"] = Value::from(clinic);
    let Value::Object(row) = row else {
        return Ok(());
    };
    let op = WriteOp::new(
        "user_clinic_permissions",
        None,
        WriteKind::Create(row),
        caller.author(state.peer_id()),
    );
    write_one(state, op).await.map(|_| ())
}

/// `GET /v1/{collection}/{id}`
pub async fn get_one(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    check_collection(&state, &collection)?;
    let permission = needed(&collection, Access::Read);
    caller.require(permission, None)?;
    let id = parse_id(&id)?;
    let (s, name) = (state.clone(), collection.clone());
    let view = blocking(move || {
        let mut view = s.store().get(&name, &id)?;
        as_shown(&s, &name, &mut view.record)?;
        Ok(view)
    })
    .await?;
    caller.require(permission, clinic_of(&view.record))?;
    log_read(
        &state,
        &caller,
        "read",
        &collection,
        Some(&view.record),
        None,
        None,
    )
    .await;
    Ok(Json(Value::Object(view.record)))
}

async fn change(
    state: AppState,
    collection: String,
    id: String,
    caller: Caller,
    kind: impl FnOnce() -> Result<WriteKind, ApiError>,
) -> Result<Json<Value>, ApiError> {
    check_collection(&state, &collection)?;
    let id = parse_id(&id)?;
    let mut kind = kind()?;
    if collection == "users"
        && let WriteKind::Patch(fields) | WriteKind::Replace(fields) = &mut kind
    {
        hash_given_password(fields).await?;
    }
    // Setting or clearing a deletion is a delete (or an undelete), whatever the verb.
    let deletes = match &kind {
        WriteKind::Delete => true,
        WriteKind::Patch(fields) | WriteKind::Replace(fields) => {
            fields.contains_key("deleted_at") || fields.contains_key("is_deleted")
        }
        WriteKind::Choose { path, .. } => {
            matches!(
                path.first().map(String::as_str),
                Some("deleted_at" | "is_deleted")
            )
        }
        _ => false,
    };
    let permission = if deletes {
        needed(&collection, Access::Delete)
    } else {
        needed(&collection, Access::Write)
    };
    caller.require(permission, None)?;
    let write = GenericWrite::of(&kind);
    if let GenericWrite::Patch(fields) | GenericWrite::Replace(fields) = &write {
        caller.require(permission, clinic_of(fields))?;
        check_super_admin(&caller, &collection, &[fields])?;
        if collection == "users" {
            let (s, fields, id) = (state.clone(), fields.clone(), id.to_string());
            blocking(move || unique_email(&s, &fields, Some(&id))).await?;
        }
    }
    let (checker, name, who) = (state.clone(), collection.clone(), caller.clone());
    blocking(move || {
        if flags_matter(&who) || name == "users" {
            // The record's clinic as it is now (and its role, for a user).
            match checker.store().get(&name, &id) {
                Ok(view) => {
                    who.require(permission, clinic_of(&view.record))?;
                    check_super_admin(&who, &name, &[&view.record])?;
                }
                Err(medmesh_storage::StoreError::NotFound { .. }) => {}
                Err(err) => return Err(err.into()),
            }
        }
        refuse_managed(&checker, &name, Some(&id), &write)
    })
    .await?;
    let credentials_change = collection == "users"
        && match &kind {
            WriteKind::Patch(f) | WriteKind::Replace(f) => [
                "hashed_password",
                "disabled_at",
                "role",
                "email",
                "deleted_at",
                "is_deleted",
            ]
            .iter()
            .any(|k| f.contains_key(*k)),
            _ => true,
        };
    let op = WriteOp::new(&collection, Some(id), kind, caller.author(state.peer_id()));
    let outcome = write_one(&state, op).await?;
    if credentials_change {
        // Tokens opened with the old credentials end (here; other nodes check the
        // user's record at every request).
        let (s, user) = (state.clone(), id.to_string());
        blocking(move || {
            s.access().sessions.revoke_user(&user).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the change is saved, but the user's open sessions could not be ended: {e:#}"),
                )
            })
        })
        .await?;
    }
    let record = masked_if_user(&collection, outcome.record);
    Ok(Json(Value::Object(record)))
}

/// `PATCH /v1/{collection}/{id}`: only the given fields change.
pub async fn patch(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change(state, collection, id, caller, || {
        Ok(WriteKind::Patch(body_object(body)?))
    })
    .await
}

/// `POST /v1/{collection}/{id}/conflicts` with `{"field": "address.town", "value": …}`:
/// a person's choice for one conflicted field (named as `GET …/conflicts` names it). It is
/// written even where it equals the value shown now, so that field's conflict is settled,
/// and no other; a `PATCH` of the value shown leaves the conflict listed.
pub async fn choose(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change(state, collection, id, caller, || {
        let mut body = body_object(body)?;
        let wrong = |message: &str| ApiError::invalid_field("field", message);
        let path: Vec<String> = match body.remove("field") {
            Some(Value::String(name)) => name.split('.').map(str::to_owned).collect(),
            _ => return Err(wrong("`field` is required: the conflicted field's name, as GET …/conflicts lists it (nested fields with dots)")),
        };
        if path.iter().any(String::is_empty) || path.len() > record::MAX_RECORD_DEPTH {
            return Err(wrong("`field` must name a field, with a dot between nested names"));
        }
        if path[0] == "password" {
            return Err(wrong("a password is never stored, so it holds no conflict: set a new one with PATCH"));
        }
        let value = body.remove("value").ok_or_else(|| {
            ApiError::invalid_field("value", "`value` is required: the value chosen")
        })?;
        if let Some(other) = body.keys().next() {
            return Err(ApiError::invalid_field(
                other.as_str(),
                format!("`{other}` is not part of a choice: send only `field` and `value`"),
            ));
        }
        Ok(WriteKind::Choose { path, value })
    })
    .await
}

/// `PUT /v1/{collection}/{id}`: the record becomes the given fields.
pub async fn replace(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    change(state, collection, id, caller, || {
        Ok(WriteKind::Replace(body_object(body)?))
    })
    .await
}

/// `DELETE /v1/{collection}/{id}`: soft delete; answers the tombstone.
pub async fn delete(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    change(state, collection, id, caller, || Ok(WriteKind::Delete)).await
}

/// `GET /v1/{collection}?field=value&field=prefix*&limit=N&cursor=C&include_deleted=true`
pub async fn list(
    State(state): State<AppState>,
    Path(collection): Path<String>,
    Extension(caller): Extension<Caller>,
    UrlQuery(params): UrlQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    check_collection(&state, &collection)?;
    let permission = needed(&collection, Access::Read);
    caller.require(permission, None)?;
    let mut query = Query {
        collection: collection.clone(),
        limit: DEFAULT_PAGE,
        ..Query::default()
    };
    for (key, value) in params {
        match key.as_str() {
            "limit" => {
                query.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "bad_query",
                            format!("limit must be a number from 1 to {MAX_PAGE}, not `{value}`"),
                        )
                    })?;
            }
            "cursor" => {
                query.cursor = Some(hex::decode(&value).map_err(|_| {
                    ApiError::bad_request(
                        "bad_query",
                        "cursor must be the `next` value of the previous page",
                    )
                })?);
            }
            "include_deleted" => {
                query.include_deleted = matches!(value.as_str(), "true" | "1" | "yes")
            }
            _ => query.filters.push(match value.strip_suffix('*') {
                Some(prefix) => Filter::Prefix {
                    field: key,
                    prefix: prefix.to_owned(),
                },
                None => Filter::Equals { field: key, value },
            }),
        }
    }
    let patient = query.filters.iter().find_map(|f| match f {
        Filter::Equals { field, value } if field == "patient_id" => Some(value.clone()),
        _ => None,
    });
    let s = state.clone();
    let mut page = blocking(move || {
        let mut page = s.store().list(&query)?;
        for record in &mut page.records {
            as_shown(&s, &query.collection, &mut record.record)?;
        }
        Ok(page)
    })
    .await?;
    // Records of clinics where the caller lacks the permission are left out.
    page.records
        .retain(|r| caller.allows(permission, clinic_of(&r.record)));
    if !page.records.is_empty() {
        let one = (page.records.len() == 1).then(|| &page.records[0].record);
        log_read(
            &state,
            &caller,
            "list",
            &collection,
            one,
            Some(page.records.len()),
            patient,
        )
        .await;
    }
    let mut answer = json!({
        "records": page.records.into_iter().map(|r| Value::Object(r.record)).collect::<Vec<_>>(),
        "next": page.next.map(hex::encode),
    });
    if !page.unreadable.is_empty() {
        answer["unreadable"] = page
            .unreadable
            .iter()
            .map(|(id, reason)| json!({"id": id, "error": reason}))
            .collect();
    }
    Ok(Json(answer))
}

/// `GET /v1/{collection}/{id}/history`: who changed what, when; oldest first. The device
/// is the one whose signature the change carries (checked when it arrived), never what
/// the change's author wrote: `signature` says `author` (the device made it), `vouched`
/// (made before signed authorship, or a record's shared first change: the device named
/// vouched for it) or `none` (a change of this device from before signed authorship).
pub async fn history(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let doc = readable_document(&state, &caller, &collection, &id, "history").await?;
    let id = parse_id(&id)?;
    let s = state.clone();
    let signers = blocking(move || Ok(s.store().signers(&id)?)).await?;
    let changes: Vec<Value> = record::history(&doc)
        .into_iter()
        .map(|entry| {
            let hash: Option<[u8; 32]> = hex::decode(&entry.hash)
                .ok()
                .and_then(|bytes| bytes.try_into().ok());
            let signer = hash.and_then(|h| signers.get(&h));
            let (device, signature) = match signer {
                Some((key, vouched)) => (
                    crate::trust::peer_of_key(key),
                    if *vouched { "vouched" } else { "author" },
                ),
                None => (None, "none"),
            };
            json!({
                "time": record::format_timestamp(entry.time_ms),
                "device": device,
                "signature": signature,
                "user": entry.author.user,
                "fields": entry.fields,
                "hash": entry.hash,
            })
        })
        .collect();
    Ok(Json(json!({ "changes": changes })))
}

/// `GET /v1/{collection}/{id}/conflicts`: fields holding concurrent values after a merge.
pub async fn conflicts(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let doc = readable_document(&state, &caller, &collection, &id, "conflicts").await?;
    Ok(Json(json!({ "conflicts": record::conflicts(&doc) })))
}

/// A record's document, when the caller may read it (the read is logged).
async fn readable_document(
    state: &AppState,
    caller: &Caller,
    collection: &str,
    id: &str,
    action: &'static str,
) -> Result<automerge::Automerge, ApiError> {
    check_collection(state, collection)?;
    let permission = needed(collection, Access::Read);
    caller.require(permission, None)?;
    let id = parse_id(id)?;
    let (s, name) = (state.clone(), collection.to_owned());
    let doc = blocking(move || Ok(s.store().document(&name, &id)?)).await?;
    let fields = record::read_record(&doc);
    caller.require(permission, clinic_of(&fields))?;
    log_read(state, caller, action, collection, Some(&fields), None, None).await;
    Ok(doc)
}

/// `POST /v1/{collection}/_import` with `{"records": [...]}`: each record is created as its
/// own document with its own change; answers a result per record, in order.
pub async fn import(
    State(state): State<AppState>,
    Path(collection): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    check_collection(&state, &collection)?;
    let permission = needed(&collection, Access::Write);
    caller.require(permission, None)?;
    refuse_managed(&state, &collection, None, &GenericWrite::Create)?;
    let records = match body_json(body)? {
        Value::Object(mut body) => match body.remove("records") {
            Some(Value::Array(records)) => records,
            _ => {
                return Err(ApiError::bad_request(
                    "bad_json",
                    "the body must be {\"records\": [ ...records... ]}",
                ));
            }
        },
        _ => {
            return Err(ApiError::bad_request(
                "bad_json",
                "the body must be {\"records\": [ ...records... ]}",
            ));
        }
    };
    if records.len() > MAX_IMPORT_RECORDS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("at most {MAX_IMPORT_RECORDS} records per import request"),
        ));
    }
    let who = caller.author(state.peer_id());
    let mut results: Vec<Option<Value>> = Vec::with_capacity(records.len());
    let mut ops = Vec::with_capacity(records.len());
    for record in records {
        match record {
            Value::Object(fields) if !caller.allows(permission, clinic_of(&fields)) => {
                results.push(Some(json!({
                    "ok": false,
                    "error": {"code": "forbidden", "permission": permission.name(), "message": format!(
                        "{} may not write this record's clinic ({}): it needs the permission `{permission}` there",
                        caller.name, clinic_of(&fields).unwrap_or("none"))}
                })));
            }
            Value::Object(fields) if check_super_admin(&caller, &collection, &[&fields]).is_err() => {
                results.push(Some(json!({
                    "ok": false,
                    "error": {"code": "forbidden", "permission": "manage_users", "message": "only a super_admin may make a super_admin"}
                })));
            }
            Value::Object(fields) => {
                results.push(None);
                ops.push(WriteOp::new(&collection, None, WriteKind::Create(fields), who.clone()));
            }
            other => results.push(Some(json!({
                "ok": false,
                "error": {"code": "bad_json", "message": format!("a record must be a JSON object, not {}", kind_of(&other))}
            }))),
        }
    }
    let outcomes = state
        .store()
        .write(WriteBatch { ops, atomic: false })
        .await?;
    let mut outcomes = outcomes.into_iter();
    let answer: Vec<Value> = results
        .into_iter()
        .map(|slot| match slot {
            Some(refused) => refused,
            None => match outcomes.next() {
                Some(Ok(outcome)) => json!({"ok": true, "id": outcome.id}),
                Some(Err(err)) => {
                    let err = ApiError::from(err);
                    json!({"ok": false, "error": {"code": err.code, "message": err.message, "field": err.field}})
                }
                None => json!({"ok": false, "error": {"code": "internal", "message": "no result"}}),
            },
        })
        .collect();
    Ok(Json(json!({ "results": answer })))
}
