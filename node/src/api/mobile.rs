//! The Hikma Health app's endpoints, exactly as its cloud answers them
//! (`HIKMA_SYNC_API.md`): `POST /api/login`, `GET` and `POST /api/v2/sync`. Their errors
//! follow that contract (401 `{"error":"Unauthorized"}`, 500 `HTTPError`), not this
//! API's: the app knows no other. The reason behind a 500 is logged for the clinic.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use medmesh_protocol::record::Fields;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use crate::access::Caller;
use crate::access::log::Entry;
use crate::access::roles::{Access, is_patient_record, needed};

/// Largest push body.
pub const MAX_PUSH_BODY: usize = 64 * 1024 * 1024;

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "Unauthorized"})),
    )
        .into_response()
}

fn failed(what: &str, err: &anyhow::Error) -> Response {
    tracing::warn!(error = %format!("{err:#}"), "the Hikma app's {what} failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"status": 500, "unhandled": true, "message": "HTTPError"})),
    )
        .into_response()
}

/// The signed-in user of a request with `Authorization: Basic`, or the 401 answer.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Fields, Response> {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(unauthorized)?;
    let (email, password) = credentials.split_once(':').ok_or_else(unauthorized)?;
    let (email, password) = (email.to_owned(), password.to_owned());
    let users = state.users();
    match tokio::task::spawn_blocking(move || users.authenticate(&email, &password)).await {
        Ok(Ok(Some(user))) => Ok(user),
        Ok(Ok(None)) => Err(unauthorized()),
        Ok(Err(err)) => Err(failed("sign-in", &err)),
        Err(err) => Err(failed("sign-in", &anyhow::anyhow!("{err}"))),
    }
}

/// The caller of a request with `Authorization: Basic` (a user with a role medmesh
/// knows), or the 401 answer.
async fn signed_in_caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    let user = signed_in(state, headers).await?;
    let s = state.clone();
    match tokio::task::spawn_blocking(move || crate::access::caller_of(&s, &user)).await {
        Ok(Ok(Ok(caller))) => Ok(caller),
        Ok(Ok(Err(reason))) => {
            tracing::warn!("the Hikma app's sign-in was refused: {reason}");
            Err(unauthorized())
        }
        Ok(Err(err)) => Err(failed("sign-in", &err)),
        Err(err) => Err(failed("sign-in", &anyhow::anyhow!("{err}"))),
    }
}

/// Why a push holds rows the caller may not write (the first such row), if it does.
pub(crate) fn refused_rows(caller: &Caller, changes: &Value) -> Option<String> {
    let tables = changes.as_object()?;
    for (table, rows) in tables {
        if !crate::mobile::PUSHED_TABLES.contains(&table.as_str()) {
            continue;
        }
        for (kind, access) in [
            ("created", Access::Write),
            ("updated", Access::Write),
            ("deleted", Access::Delete),
        ] {
            let permission = needed(table, access);
            for row in rows
                .get(kind)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let clinic = row.as_object().and_then(super::records::clinic_of);
                if !caller.allows(permission, clinic) {
                    return Some(format!(
                        "{} ({}) may not write `{table}` rows{}: it needs the permission `{permission}`; nothing of this push was stored",
                        caller.name,
                        caller.role,
                        clinic
                            .map(|c| format!(" of clinic {c}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    None
}

/// Keeps in a pull only the rows the caller's role may read; answers, per table of
/// patients' records, how many rows it holds (for the access log).
pub(crate) fn keep_readable(caller: &Caller, answer: &mut Value) -> Vec<(String, usize)> {
    let mut read = Vec::new();
    if let Some(tables) = answer["changes"].as_object_mut() {
        for (table, changes) in tables.iter_mut() {
            let permission = needed(table, Access::Read);
            for kind in ["created", "updated"] {
                if let Some(rows) = changes.get_mut(kind).and_then(Value::as_array_mut) {
                    rows.retain(|row| {
                        caller.allows(
                            permission,
                            row.as_object().and_then(super::records::clinic_of),
                        )
                    });
                }
            }
            let count = ["created", "updated"]
                .iter()
                .filter_map(|k| changes.get(*k).and_then(Value::as_array))
                .map(Vec::len)
                .sum::<usize>();
            if count > 0 && is_patient_record(table) {
                read.push((table.clone(), count));
            }
        }
    }
    read
}

/// The sync's query parameters.
#[derive(Debug, Deserialize)]
pub struct SyncParams {
    last_pulled_at: Option<String>,
    #[serde(rename = "lastPulledAt")]
    last_pulled_at_camel: Option<String>,
}

impl SyncParams {
    /// `last_pulled_at` as a number; absent, `null` or not a number: a first pull.
    fn since(&self) -> Option<i64> {
        self.last_pulled_at
            .as_deref()
            .or(self.last_pulled_at_camel.as_deref())
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|t| t.is_finite())
            .map(|t| t as i64)
    }
}

/// `GET /api/v2/sync?last_pulled_at=MS`
pub async fn pull(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<SyncParams>,
) -> Response {
    let caller = match signed_in_caller(&state, &headers).await {
        Ok(caller) => caller,
        Err(answer) => return answer,
    };
    let mobile = state.mobile();
    let since = params.since();
    match tokio::task::spawn_blocking(move || mobile.pull(since)).await {
        Ok(Ok(mut answer)) => {
            // Only what the user's role may read, and the reads in the access log.
            for (table, count) in keep_readable(&caller, &mut answer) {
                state
                    .access_log()
                    .record(Entry {
                        caller: caller.clone(),
                        action: "app_sync",
                        collection: table,
                        record_id: None,
                        patient_id: None,
                        count: Some(count),
                    })
                    .await;
            }
            answer["success"] = json!(true);
            Json(answer).into_response()
        }
        Ok(Err(err)) => failed("pull", &err),
        Err(err) => failed("pull", &anyhow::anyhow!("{err}")),
    }
}

/// `POST /api/v2/sync?last_pulled_at=MS` with the changes object as the body.
pub async fn push(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match signed_in_caller(&state, &headers).await {
        Ok(caller) => caller,
        Err(answer) => return answer,
    };
    let changes: Value = match serde_json::from_slice(&body) {
        Ok(changes) => changes,
        Err(err) => return failed("push", &anyhow::anyhow!("the body is not JSON: {err}")),
    };
    if let Some(refused) = refused_rows(&caller, &changes) {
        tracing::warn!(user = %caller.name, "{refused}");
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "Forbidden", "message": refused})),
        )
            .into_response();
    }
    let mobile = state.mobile();
    let name = caller.name.clone();
    match tokio::task::spawn_blocking(move || mobile.push(&changes, &name)).await {
        Ok(Ok(summary)) => {
            tracing::debug!(?summary, "the Hikma app pushed");
            Json(json!({"success": true})).into_response()
        }
        Ok(Err(err)) => failed("push", &err),
        Err(err) => failed("push", &anyhow::anyhow!("{err}")),
    }
}

/// The body of a sign-in.
#[derive(Debug, Deserialize)]
pub struct Login {
    email: String,
    password: String,
}

/// `POST /api/login {"email", "password"}`: the user row (password hash masked), its
/// clinic's name and a token; `401 {}` for wrong credentials.
pub async fn login(State(state): State<AppState>, body: Bytes) -> Response {
    let Ok(login) = serde_json::from_slice::<Login>(&body) else {
        return (StatusCode::UNAUTHORIZED, Json(json!({}))).into_response();
    };
    let users = state.users();
    let store = state.store().clone();
    let found = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Fields>> {
        let Some(user) = users.authenticate(&login.email, &login.password)? else {
            return Ok(None);
        };
        let mut user = crate::users::masked(user);
        let clinic = user
            .get("clinic_id")
            .and_then(Value::as_str)
            .and_then(|c| c.parse().ok())
            .and_then(|c| store.get("clinics", &c).ok())
            .and_then(|v| v.record.get("name").cloned());
        user.insert("clinic_name".into(), clinic.unwrap_or(Value::Null));
        user.insert(
            "token".into(),
            Value::from(hex::encode(rand::random::<[u8; 24]>())),
        );
        Ok(Some(user))
    })
    .await;
    match found {
        Ok(Ok(Some(user))) => Json(Value::Object(user)).into_response(),
        Ok(Ok(None)) => (StatusCode::UNAUTHORIZED, Json(json!({}))).into_response(),
        Ok(Err(err)) => failed("sign-in", &err),
        Err(err) => failed("sign-in", &anyhow::anyhow!("{err}")),
    }
}
