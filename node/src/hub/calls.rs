//! The commands and queries the Hikma app sends a hub, answered from the node's store in
//! the shapes the app reads (the app's source, restated in the crate's notes on the hub):
//! online answers carry records as stored — snake_case, JSON columns as JSON, times as
//! ISO text — while `sync_pull` and `sync_push` are the app's sync, as on `/api/v2/sync`.
//!
//! Every call but `login`, `ping` and `heartbeat` needs the token `login` gave; every
//! record read or written is checked against the caller's role and clinics like the
//! node's own API, and reads of patients' records go to the access log.

use std::collections::HashMap;

use medmesh_protocol::DocId;
use medmesh_protocol::record::Fields;
use medmesh_storage::{Filter, Query, RecordView, StoreError, WriteBatch, WriteKind, WriteOp};
use serde_json::{Value, json};

use super::{Hub, TOKEN_HOURS};
use crate::access::log::Entry;
use crate::access::roles::{Access, is_patient_record, needed};
use crate::access::{Caller, caller_of, user_of_session};
use crate::api::AppState;
use crate::api::records::clinic_of;
use crate::forms::stored_value;

/// A command (its `data`) or a query (its `params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/rpc/command`.
    Command,
    /// `/rpc/query`.
    Query,
}

/// One decrypted request.
#[derive(Debug, Clone)]
pub struct Call {
    /// Command or query.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Its `data` or `params`.
    pub args: Value,
    /// The token from `login`, if any.
    pub token: Option<String>,
}

/// Why a call was not answered.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No valid token (HTTP 401: the app's "AUTH_FAILED").
    #[error("{0}")]
    Unauthorized(String),
    /// Refused or failed: the reason goes to the log and, as the hub does, in `error`.
    #[error("{0}")]
    Failed(String),
}

impl From<StoreError> for CallError {
    fn from(err: StoreError) -> Self {
        CallError::Failed(err.to_string())
    }
}

impl From<anyhow::Error> for CallError {
    fn from(err: anyhow::Error) -> Self {
        CallError::Failed(format!("{err:#}"))
    }
}

type Answer = Result<Value, CallError>;

/// Who is calling: the caller and their user record.
struct Context {
    state: AppState,
    hub: std::sync::Arc<Hub>,
    client: String,
    caller: Caller,
    user: Fields,
    /// Reads to append to the access log once answered.
    reads: Vec<Entry>,
}

/// Answers a call from the tablet `client_id`.
pub async fn answer(
    state: &AppState,
    hub: &std::sync::Arc<Hub>,
    client_id: &str,
    call: Call,
) -> Answer {
    let now = chrono::Utc::now().timestamp_millis();
    match (call.kind, call.name.as_str()) {
        (_, "ping") => return Ok(json!({"pong": true})),
        (Kind::Query, "heartbeat") => return Ok(json!({"status": "ok"})),
        (Kind::Command, "login") => return login(state, hub, client_id, &call.args, now).await,
        _ => {}
    }
    let token = call
        .token
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            CallError::Unauthorized("this call needs a signed-in user: log in first".into())
        })?;
    let s = state.clone();
    let client = client_id.to_owned();
    let hub = hub.clone();
    let (answer, reads) =
        tokio::task::spawn_blocking(move || -> Result<(Value, Vec<Entry>), CallError> {
            let state = s;
            let session = state
                .access()
                .sessions
                .find_extending(&token, now, TOKEN_HOURS)
                .filter(|s| s.client.as_deref().is_none_or(|c| c == client))
                .ok_or_else(|| {
                    CallError::Unauthorized(
                    "this token is unknown, expired or ended: sign in again (scan the hub's code)"
                        .into(),
                )
                })?;
            let user = user_of_session(&state, &session)?.map_err(CallError::Unauthorized)?;
            let caller = caller_of(&state, &user)?.map_err(CallError::Unauthorized)?;
            let mut context = Context {
                state,
                hub,
                client,
                caller,
                user,
                reads: Vec::new(),
            };
            let answer = dispatch(&mut context, &call, now)?;
            Ok((answer, context.reads))
        })
        .await
        .map_err(|_| CallError::Failed("the call was interrupted; try again".into()))??;
    for entry in reads {
        state.access_log().record(entry).await;
    }
    Ok(answer)
}

fn dispatch(cx: &mut Context, call: &Call, now: i64) -> Answer {
    let args = &call.args;
    match (call.kind, call.name.as_str()) {
        (Kind::Query, "sync_pull") => sync_pull(cx, args),
        (Kind::Command, "sync_push") => sync_push(cx, args),
        (Kind::Query, "get_patients") => patients(cx, args, None),
        (Kind::Query, "search_patients") => {
            let text = args["filters"]["given_name"]
                .as_str()
                .map(str::trim)
                .unwrap_or_default()
                .to_owned();
            patients(cx, args, Some(text))
        }
        (Kind::Query, "get_patient") => get_patient(cx, text_arg(args, "patient_id")?),
        (Kind::Command, "register_patient") => register_patient(cx, args),
        (Kind::Query, "get_visits") => {
            let visits = of_patient(
                cx,
                "visits",
                text_arg(args, "patient_id")?,
                "check_in_timestamp",
            )?;
            Ok(json!({"data": visits}))
        }
        (Kind::Command, "visits.create") => {
            let mut fields = pick(
                args,
                &[
                    "patient_id",
                    "clinic_id",
                    "provider_id",
                    "provider_name",
                    "check_in_timestamp",
                    "metadata",
                ],
            );
            fields
                .entry("check_in_timestamp")
                .or_insert_with(|| json!(medmesh_protocol::record::format_timestamp(now)));
            let id = create(cx, "visits", fields)?;
            Ok(json!({"success": true, "id": id}))
        }
        (Kind::Query, "get_visit_events") => {
            let visit = text_arg(args, "visit_id")?;
            let events = of_patient(cx, "events", text_arg(args, "patient_id")?, "created_at")?
                .into_iter()
                .filter(|e| e["visit_id"].as_str() == Some(visit))
                .collect::<Vec<_>>();
            Ok(json!({"data": events}))
        }
        (Kind::Query, "events.by_form") => {
            let form = text_arg(args, "form_id")?;
            let events = of_patient(cx, "events", text_arg(args, "patient_id")?, "created_at")?
                .into_iter()
                .filter(|e| e["form_id"].as_str() == Some(form))
                .collect::<Vec<_>>();
            Ok(Value::Array(events))
        }
        (Kind::Command, "events.create") => create_event(cx, args, now),
        (Kind::Command, "events.update") => {
            let fields = pick(args, &["form_data", "metadata"]);
            update(cx, "events", text_arg(args, "id")?, fields)
        }
        (Kind::Command, "events.delete") => {
            delete(cx, "events", text_arg(args, "id")?)?;
            Ok(json!({"success": true}))
        }
        (Kind::Query, "vitals.list") => {
            let mut vitals = of_patient(
                cx,
                "patient_vitals",
                text_arg(args, "patient_id")?,
                "timestamp",
            )?;
            for row in &mut vitals {
                if let Some(row) = row.as_object_mut() {
                    for column in VITALS {
                        row.entry(*column).or_insert(Value::Null);
                    }
                }
            }
            Ok(Value::Array(vitals))
        }
        (Kind::Command, "vitals.create") => {
            let mut columns = vec![
                "patient_id",
                "visit_id",
                "timestamp",
                "recorded_by_user_id",
                "metadata",
            ];
            columns.extend_from_slice(VITALS);
            let mut fields = pick(args, &columns);
            fields
                .entry("timestamp")
                .or_insert_with(|| json!(medmesh_protocol::record::format_timestamp(now)));
            let id = create(cx, "patient_vitals", fields)?;
            Ok(json!({"success": true, "id": id}))
        }
        (Kind::Query, "problems.list") => Ok(Value::Array(of_patient(
            cx,
            "patient_problems",
            text_arg(args, "patient_id")?,
            "created_at",
        )?)),
        (Kind::Query, "problems.get") => {
            let id = parse_id(text_arg(args, "id")?)?;
            let view = read(cx, "patient_problems", &id)?
                .ok_or_else(|| CallError::Failed("Problem not found".into()))?;
            Ok(online(view))
        }
        (Kind::Command, "problems.create") => {
            let fields = pick(args, PROBLEM_COLUMNS);
            let id = create(cx, "patient_problems", fields)?;
            Ok(json!({"success": true, "id": id}))
        }
        (Kind::Command, "problems.update") => {
            let columns: Vec<&str> = PROBLEM_COLUMNS
                .iter()
                .copied()
                .filter(|c| !matches!(*c, "patient_id" | "recorded_by_user_id"))
                .collect();
            let fields = pick(args, &columns);
            update(cx, "patient_problems", text_arg(args, "id")?, fields)
        }
        (kind, name) => Err(CallError::Failed(format!(
            "Unknown {}: {name}",
            if kind == Kind::Command {
                "command"
            } else {
                "query"
            }
        ))),
    }
}

/// The measurement columns of `patient_vitals`.
const VITALS: &[&str] = &[
    "systolic_bp",
    "diastolic_bp",
    "bp_position",
    "height_cm",
    "weight_kg",
    "bmi",
    "waist_circumference_cm",
    "heart_rate",
    "pulse_rate",
    "oxygen_saturation",
    "respiratory_rate",
    "temperature_celsius",
    "pain_level",
];

/// Additional attributes one `register_patient` may carry (a registration form has tens).
const MAX_ATTRIBUTES: usize = 1000;

/// The columns of `patient_problems` the app sends.
const PROBLEM_COLUMNS: &[&str] = &[
    "patient_id",
    "visit_id",
    "problem_code_system",
    "problem_code",
    "problem_label",
    "clinical_status",
    "verification_status",
    "severity_score",
    "onset_date",
    "end_date",
    "recorded_by_user_id",
    "metadata",
];

async fn login(state: &AppState, hub: &Hub, client_id: &str, args: &Value, now: i64) -> Answer {
    let email = args["email"].as_str().unwrap_or_default().trim().to_owned();
    let password = args["password"].as_str().unwrap_or_default().to_owned();
    let s = state.clone();
    let client = client_id.to_owned();
    let answer = tokio::task::spawn_blocking(move || -> Answer {
        let refused = || CallError::Failed("Invalid email or password".into());
        let user = s.users().authenticate(&email, &password)?.ok_or_else(refused)?;
        let caller = match caller_of(&s, &user)? {
            Ok(caller) => caller,
            Err(reason) => {
                tracing::warn!(email = %email, "a tablet's sign-in through the hub was refused: {reason}");
                return Err(refused());
            }
        };
        let user_id = caller
            .user_id
            .clone()
            .ok_or_else(|| CallError::Failed("the user has no id".into()))?;
        let (token, _) = s
            .access()
            .sessions
            .issue_for(&user_id, &email, TOKEN_HOURS, now, Some(&client))?;
        let clinic_id = user.get("clinic_id").and_then(Value::as_str).map(str::to_owned);
        let clinic_name = clinic_id
            .as_deref()
            .and_then(|c| c.parse::<DocId>().ok())
            .and_then(|c| s.store().get("clinics", &c).ok())
            .and_then(|v| v.record.get("name").cloned());
        // The app counts itself signed in only with a non-empty provider name.
        let name = user
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(&email)
            .to_owned();
        Ok(json!({
            "token": token,
            "user_id": user_id,
            "clinic_id": clinic_id,
            "role": caller.role.name(),
            "provider_name": name,
            "clinic_name": clinic_name,
            "email": user.get("email").cloned().unwrap_or(Value::from(email.clone())),
        }))
    })
    .await
    .map_err(|_| CallError::Failed("the sign-in was interrupted; try again".into()))??;
    if let Some(email) = answer["email"].as_str() {
        hub.signed_in(client_id, email);
    }
    Ok(answer)
}

fn sync_pull(cx: &mut Context, args: &Value) -> Answer {
    let since = ["lastPulledAt", "last_pulled_at"]
        .iter()
        .find_map(|k| args[*k].as_f64())
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(|t| t as i64);
    let pushed = cx.hub.pushed_by(&cx.client);
    let mut answer = cx.state.mobile().pull_except(since, Some(&pushed))?;
    let counts = crate::api::mobile::keep_readable(&cx.caller, &mut answer);
    for (table, count) in counts {
        cx.reads.push(Entry {
            caller: cx.caller.clone(),
            action: "app_sync",
            collection: table,
            record_id: None,
            patient_id: None,
            count: Some(count),
        });
    }
    // The app applies deletions given as objects with an `id` (ids alone it ignores).
    if let Some(tables) = answer["changes"].as_object_mut() {
        for changes in tables.values_mut() {
            if let Some(deleted) = changes.get_mut("deleted").and_then(Value::as_array_mut) {
                for id in deleted.iter_mut() {
                    if let Value::String(text) = id {
                        *id = json!({"id": text.clone()});
                    }
                }
            }
        }
    }
    Ok(answer)
}

fn sync_push(cx: &mut Context, args: &Value) -> Answer {
    let changes = &args["changes"];
    if let Some(refused) = crate::api::mobile::refused_rows(&cx.caller, changes) {
        return Err(CallError::Failed(refused));
    }
    let summary = cx.state.mobile().push(changes, &cx.caller.name)?;
    cx.hub.pushed(&cx.client, &summary.written);
    Ok(json!({}))
}

/// The `patients` list (or search by the start of a given name): `{data, total, limit,
/// offset}`. `total` is the count of live patients without a search, else of matches.
fn patients(cx: &mut Context, args: &Value, search: Option<String>) -> Answer {
    let limit = args["limit"].as_u64().unwrap_or(20).clamp(1, 1000) as usize;
    let offset = args["offset"].as_u64().unwrap_or(0).min(1_000_000) as usize;
    let permission = needed("patients", Access::Read);
    let filters = match search.as_deref().filter(|s| !s.is_empty()) {
        Some(text) => vec![Filter::Prefix {
            field: "given_name".into(),
            prefix: text.to_owned(),
        }],
        None => Vec::new(),
    };
    let searching = !filters.is_empty();
    let mut rows = Vec::new();
    let mut seen = 0usize;
    let mut cursor = None;
    loop {
        let page = cx.state.store().list(&Query {
            collection: "patients".into(),
            filters: filters.clone(),
            limit: 500,
            cursor,
            ..Query::default()
        })?;
        for view in page.records {
            if !cx.caller.allows(permission, clinic_of(&view.record)) {
                continue;
            }
            if seen >= offset && rows.len() < limit {
                rows.push(online(view));
            }
            seen += 1;
        }
        // Without a search, stop once the page is full (the total is the count kept).
        match page.next {
            Some(next) if searching || rows.len() < limit => cursor = Some(next),
            _ => break,
        }
    }
    let total = if searching {
        seen
    } else {
        let live = cx
            .state
            .store()
            .counts()?
            .get("patients")
            .copied()
            .unwrap_or(0) as usize;
        live.max(seen)
    };
    cx.reads.push(Entry {
        caller: cx.caller.clone(),
        action: "list",
        collection: "patients".into(),
        record_id: None,
        patient_id: None,
        count: Some(rows.len()),
    });
    Ok(json!({"data": rows, "total": total, "limit": limit, "offset": offset}))
}

/// One patient as the registration form shows it: `{fields, values}` keyed by the
/// form's field ids; `{"error"}` (a success) when there is no such patient.
fn get_patient(cx: &mut Context, id: &str) -> Answer {
    let not_found = || Ok(json!({"fields": [], "values": {}, "error": "Patient not found"}));
    let Ok(id) = id.parse::<DocId>() else {
        return not_found();
    };
    let Some(view) = read(cx, "patients", &id)? else {
        return not_found();
    };
    let patient = view.record;
    let fields = registration_fields(cx)?;
    let attributes = list_where(
        cx,
        "patient_additional_attributes",
        "patient_id",
        &id.to_string(),
    )?;
    let mut values = serde_json::Map::new();
    let fields = if fields.is_empty() {
        // No registration form: the patient's own columns as base fields.
        patient
            .iter()
            .map(|(column, value)| {
                values.insert(column.clone(), value.clone());
                json!({"id": column, "column": column, "baseField": true, "fieldType": "text",
                       "label": column, "visible": true, "required": false, "deleted": false})
            })
            .collect()
    } else {
        for field in &fields {
            let Some(field_id) = field["id"].as_str() else {
                continue;
            };
            if field["baseField"].as_bool() == Some(true) {
                if let Some(value) = field["column"].as_str().and_then(|c| patient.get(c)) {
                    values.insert(field_id.to_owned(), value.clone());
                }
                continue;
            }
            let newest = attributes
                .iter()
                .filter(|a| a.record.get("attribute_id").and_then(Value::as_str) == Some(field_id))
                .max_by_key(|a| {
                    a.record
                        .get("updated_at")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                });
            if let Some(attribute) = newest {
                let column = match field["fieldType"].as_str() {
                    Some("number") => "number_value",
                    Some("date") => "date_value",
                    Some("boolean") => "boolean_value",
                    _ => "string_value",
                };
                let value = attribute
                    .record
                    .get(column)
                    .filter(|v| !v.is_null())
                    .or_else(|| attribute.record.get("string_value"))
                    .cloned()
                    .unwrap_or(Value::Null);
                values.insert(field_id.to_owned(), value);
            }
        }
        fields
    };
    Ok(json!({"fields": fields, "values": values}))
}

/// The fields of the newest registration form in force.
fn registration_fields(cx: &Context) -> Result<Vec<Value>, CallError> {
    let forms = list_where_all(cx, "registration_forms")?;
    let newest = forms.into_iter().filter(|f| !f.deleted).max_by_key(|f| {
        f.record
            .get("updated_at")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    });
    let Some(form) = newest else {
        return Ok(Vec::new());
    };
    let fields = match form.record.get("fields") {
        Some(Value::Array(fields)) => fields.clone(),
        Some(Value::String(text)) => serde_json::from_str::<Vec<Value>>(text).unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(fields
        .into_iter()
        .filter(|f| f["deleted"].as_bool() != Some(true))
        .collect())
}

/// `register_patient`: the patient made or updated, and its additional attributes
/// upserted by (patient, attribute), in one atomic write.
fn register_patient(cx: &mut Context, args: &Value) -> Answer {
    let sent = args["patient"]
        .as_object()
        .ok_or_else(|| CallError::Failed("`patient` must be an object".into()))?;
    let id = sent
        .get("id")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<DocId>().ok())
        .unwrap_or_else(DocId::new_v7);
    let mut fields = Fields::new();
    for (name, value) in sent {
        if matches!(
            name.as_str(),
            "id" | "created_at" | "updated_at" | "_status" | "_changed"
        ) {
            continue;
        }
        if matches!(name.as_str(), "primary_clinic_id" | "last_modified_by")
            && value.as_str().is_none_or(str::is_empty)
        {
            continue;
        }
        fields.insert(name.clone(), value.clone());
    }
    let mut fields = stored(cx, "patients", fields);
    fields.insert(
        "last_modified_by".into(),
        json!(cx.caller.user_id.clone().unwrap_or_default()),
    );
    let author = cx.caller.author(cx.state.peer_id());
    let existing = read(cx, "patients", &id)?;
    let mut ops = Vec::new();
    let clinic = match &existing {
        Some(view) => clinic_of(&view.record).map(str::to_owned),
        None => fields
            .get("primary_clinic_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| home_clinic(cx)),
    };
    cx.caller
        .require(needed("patients", Access::Write), clinic.as_deref())
        .map_err(|e| CallError::Failed(e.message))?;
    match existing {
        Some(_) => ops.push(WriteOp::new(
            "patients",
            Some(id),
            WriteKind::Patch(fields),
            author.clone(),
        )),
        None => {
            if let Some(clinic) = &clinic {
                fields.entry("primary_clinic_id").or_insert(json!(clinic));
            }
            if let Some(created) = sent.get("created_at") {
                fields.insert(
                    "created_at".into(),
                    stored_value(
                        Some(medmesh_protocol::schema::FieldType::Timestamp),
                        created.clone(),
                    ),
                );
            }
            fields.insert("id".into(), json!(id.to_string()));
            ops.push(WriteOp::new(
                "patients",
                Some(id),
                WriteKind::Create(fields),
                author.clone(),
            ));
        }
    }
    let kept: HashMap<String, DocId> = list_where(
        cx,
        "patient_additional_attributes",
        "patient_id",
        &id.to_string(),
    )?
    .into_iter()
    .filter_map(|a| {
        let attribute = a.record.get("attribute_id")?.as_str()?.to_owned();
        Some((attribute, a.id))
    })
    .collect();
    let attributes = args["additional_attributes"].as_array();
    if attributes.is_some_and(|a| a.len() > MAX_ATTRIBUTES) {
        return Err(CallError::Failed(format!(
            "a patient may carry at most {MAX_ATTRIBUTES} additional attributes"
        )));
    }
    let mut count = 0;
    for attribute in attributes.into_iter().flatten() {
        let Some(attribute_id) = attribute["attribute_id"]
            .as_str()
            .or_else(|| attribute["id"].as_str())
            .filter(|a| !a.is_empty())
        else {
            continue;
        };
        let mut row = pick(
            attribute,
            &[
                "attribute",
                "string_value",
                "number_value",
                "boolean_value",
                "date_value",
                "metadata",
            ],
        );
        row.insert("patient_id".into(), json!(id.to_string()));
        row.insert("attribute_id".into(), json!(attribute_id));
        let row = stored(cx, "patient_additional_attributes", row);
        match kept.get(attribute_id) {
            Some(existing) => ops.push(WriteOp::new(
                "patient_additional_attributes",
                Some(*existing),
                WriteKind::Patch(row),
                author.clone(),
            )),
            None => ops.push(WriteOp::new(
                "patient_additional_attributes",
                None,
                WriteKind::Create(row),
                author.clone(),
            )),
        }
        count += 1;
    }
    write_all(cx, ops)?;
    Ok(json!({"patient_id": id.to_string(), "attributes_count": count}))
}

/// `events.create`: the event, in a new visit of the signed-in user's clinic when the app
/// names none; answers both ids.
fn create_event(cx: &mut Context, args: &Value, now: i64) -> Answer {
    let patient = text_arg(args, "patient_id")?.to_owned();
    let visit_id = match args["visit_id"].as_str().filter(|v| !v.is_empty()) {
        Some(visit) => visit.to_owned(),
        None => {
            let mut visit = Fields::new();
            visit.insert("patient_id".into(), json!(patient));
            if let Some(clinic) = home_clinic(cx) {
                visit.insert("clinic_id".into(), json!(clinic));
            }
            visit.insert("provider_id".into(), json!(cx.caller.user_id.clone()));
            visit.insert(
                "provider_name".into(),
                cx.user
                    .get("name")
                    .cloned()
                    .unwrap_or(json!(cx.caller.name.clone())),
            );
            visit.insert(
                "check_in_timestamp".into(),
                json!(medmesh_protocol::record::format_timestamp(now)),
            );
            create(cx, "visits", visit)?
        }
    };
    let mut event = pick(
        args,
        &[
            "patient_id",
            "event_type",
            "form_id",
            "form_data",
            "metadata",
            "recorded_by_user_id",
        ],
    );
    event.insert("visit_id".into(), json!(visit_id));
    let id = create(cx, "events", event)?;
    Ok(json!({"success": true, "id": id, "visit_id": visit_id}))
}

fn home_clinic(cx: &Context) -> Option<String> {
    cx.user
        .get("clinic_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The named columns of `args` present, as sent.
fn pick(args: &Value, columns: &[&str]) -> Fields {
    let mut fields = Fields::new();
    for column in columns {
        if let Some(value) = args.get(*column) {
            fields.insert((*column).to_owned(), value.clone());
        }
    }
    fields
}

fn text_arg<'a>(args: &'a Value, name: &str) -> Result<&'a str, CallError> {
    args[name]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| CallError::Failed(format!("`{name}` is missing")))
}

fn parse_id(text: &str) -> Result<DocId, CallError> {
    text.parse()
        .map_err(|_| CallError::Failed(format!("`{text}` is not an id")))
}

/// Converts sent values to their stored forms, by the collection's schema.
fn stored(cx: &Context, collection: &str, fields: Fields) -> Fields {
    let schema = cx.state.store().schema();
    let spec = schema.collection(collection);
    fields
        .into_iter()
        .map(|(name, value)| {
            let ty = spec.and_then(|s| s.field(&name)).map(|f| f.ty);
            (name, stored_value(ty, value))
        })
        .collect()
}

/// A record the caller may read (`None` when there is none, or it is deleted).
fn read(cx: &mut Context, collection: &str, id: &DocId) -> Result<Option<RecordView>, CallError> {
    let view = match cx.state.store().get(collection, id) {
        Ok(view) if !view.deleted => view,
        Ok(_) | Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    cx.caller
        .require(needed(collection, Access::Read), clinic_of(&view.record))
        .map_err(|e| CallError::Failed(e.message))?;
    if is_patient_record(collection) {
        cx.reads.push(Entry {
            caller: cx.caller.clone(),
            action: "read",
            collection: collection.to_owned(),
            record_id: Some(id.to_string()),
            patient_id: view
                .record
                .get(if collection == "patients" {
                    "id"
                } else {
                    "patient_id"
                })
                .and_then(Value::as_str)
                .map(str::to_owned),
            count: None,
        });
    }
    Ok(Some(view))
}

/// Every live record of `collection` whose `field` is `value`.
fn list_where(
    cx: &Context,
    collection: &str,
    field: &str,
    value: &str,
) -> Result<Vec<RecordView>, CallError> {
    list(
        cx,
        collection,
        vec![Filter::Equals {
            field: field.into(),
            value: value.into(),
        }],
    )
}

fn list_where_all(cx: &Context, collection: &str) -> Result<Vec<RecordView>, CallError> {
    list(cx, collection, Vec::new())
}

fn list(
    cx: &Context,
    collection: &str,
    filters: Vec<Filter>,
) -> Result<Vec<RecordView>, CallError> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = cx.state.store().list(&Query {
            collection: collection.into(),
            filters: filters.clone(),
            limit: 1000,
            cursor,
            ..Query::default()
        })?;
        out.extend(page.records);
        match page.next {
            Some(next) if out.len() < 100_000 => cursor = Some(next),
            _ => break,
        }
    }
    Ok(out)
}

/// A patient's live records of `collection` the caller may read, newest `order` first.
fn of_patient(
    cx: &mut Context,
    collection: &str,
    patient: &str,
    order: &str,
) -> Result<Vec<Value>, CallError> {
    let permission = needed(collection, Access::Read);
    let mut rows: Vec<RecordView> = list_where(cx, collection, "patient_id", patient)?
        .into_iter()
        .filter(|v| !v.deleted && cx.caller.allows(permission, clinic_of(&v.record)))
        .collect();
    rows.sort_by_key(|v| {
        std::cmp::Reverse(
            v.record
                .get(order)
                .and_then(medmesh_protocol::record::timestamp_ms)
                .unwrap_or(0),
        )
    });
    if is_patient_record(collection) {
        cx.reads.push(Entry {
            caller: cx.caller.clone(),
            action: "list",
            collection: collection.to_owned(),
            record_id: None,
            patient_id: Some(patient.to_owned()),
            count: Some(rows.len()),
        });
    }
    Ok(rows.into_iter().map(online).collect())
}

/// A record as an online answer carries it: stored values, JSON columns as JSON (the app
/// maps over `form_data`), no password hash.
fn online(view: RecordView) -> Value {
    let mut row = view.record;
    row.insert("id".into(), json!(view.id.to_string()));
    row.insert("is_deleted".into(), json!(view.deleted));
    row.remove("hashed_password");
    for column in ["form_data", "metadata", "additional_data"] {
        if let Some(Value::String(text)) = row.get(column)
            && let Ok(parsed @ (Value::Object(_) | Value::Array(_))) =
                serde_json::from_str::<Value>(text)
        {
            row.insert(column.to_owned(), parsed);
        }
    }
    Value::Object(row)
}

/// Makes a record the caller may write; answers its id.
fn create(cx: &mut Context, collection: &str, fields: Fields) -> Result<String, CallError> {
    let fields = stored(cx, collection, fields);
    cx.caller
        .require(needed(collection, Access::Write), clinic_of(&fields))
        .map_err(|e| CallError::Failed(e.message))?;
    let op = WriteOp::new(
        collection,
        None,
        WriteKind::Create(fields),
        cx.caller.author(cx.state.peer_id()),
    );
    let outcome = write_one(cx, op)?;
    Ok(outcome.id.to_string())
}

/// Changes the named columns of a record the caller may write; answers it as stored.
fn update(cx: &mut Context, collection: &str, id: &str, fields: Fields) -> Answer {
    let id = parse_id(id)?;
    let view = read(cx, collection, &id)?
        .ok_or_else(|| CallError::Failed(format!("there is no such record in {collection}")))?;
    cx.caller
        .require(needed(collection, Access::Write), clinic_of(&view.record))
        .map_err(|e| CallError::Failed(e.message))?;
    let fields = stored(cx, collection, fields);
    let op = WriteOp::new(
        collection,
        Some(id),
        WriteKind::Patch(fields),
        cx.caller.author(cx.state.peer_id()),
    );
    let outcome = write_one(cx, op)?;
    Ok(online(RecordView {
        collection: collection.to_owned(),
        id,
        record: outcome.record,
        deleted: false,
        seq: outcome.seq,
    }))
}

fn delete(cx: &mut Context, collection: &str, id: &str) -> Result<(), CallError> {
    let id = parse_id(id)?;
    let view = read(cx, collection, &id)?
        .ok_or_else(|| CallError::Failed(format!("there is no such record in {collection}")))?;
    cx.caller
        .require(needed(collection, Access::Delete), clinic_of(&view.record))
        .map_err(|e| CallError::Failed(e.message))?;
    let op = WriteOp::new(
        collection,
        Some(id),
        WriteKind::Delete,
        cx.caller.author(cx.state.peer_id()),
    );
    write_one(cx, op)?;
    Ok(())
}

fn write_one(cx: &Context, op: WriteOp) -> Result<medmesh_storage::WriteOutcome, CallError> {
    let mut outcomes = cx.state.store().write_blocking(WriteBatch::one(op))?;
    match outcomes.pop() {
        Some(result) => Ok(result?),
        None => Err(CallError::Failed(
            "the store gave no answer for the write".into(),
        )),
    }
}

fn write_all(cx: &Context, ops: Vec<WriteOp>) -> Result<(), CallError> {
    for result in cx
        .state
        .store()
        .write_blocking(WriteBatch { ops, atomic: true })?
    {
        result?;
    }
    Ok(())
}
