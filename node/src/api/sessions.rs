//! Sessions: `POST /v1/sessions` signs a user in and answers a token, `DELETE
//! /v1/sessions/current` signs it out, `GET /v1/me` says who the caller is and what they
//! may do.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::records::body_object;
use super::{ApiError, AppState, blocking};
use crate::access::tokens::DEFAULT_SESSION_HOURS;
use crate::access::{Caller, Credential, Permission, credential};

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

/// `POST /v1/sessions` with `{"email", "password", "hours"?}` (or HTTP Basic and `{}`).
pub async fn open(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let fields = body_object(body)?;
    let text = |name: &str| fields.get(name).and_then(Value::as_str).map(str::to_owned);
    let (email, password) = match (text("email"), text("password"), credential(&headers)) {
        (Some(email), Some(password), _) => (email, password),
        (_, _, Some(Credential::Basic(email, password))) => (email, password),
        _ => {
            return Err(ApiError::bad_request(
                "missing_credentials",
                "send the user's email and password: {\"email\": \"...\", \"password\": \"...\"}",
            ));
        }
    };
    let hours = match fields.get("hours") {
        None | Some(Value::Null) => DEFAULT_SESSION_HOURS,
        Some(value) => value.as_i64().filter(|h| *h > 0).ok_or_else(|| {
            ApiError::bad_request(
                "bad_hours",
                "`hours` must be a whole number of hours above 0",
            )
        })?,
    };
    let s = state.clone();
    blocking(move || {
        let Some(user) = s
            .users()
            .authenticate(&email, &password)
            .map_err(internal)?
        else {
            // A disabled user who knows their password is told why.
            let disabled = s
                .users()
                .find(&email)
                .map_err(internal)?
                .filter(crate::access::is_disabled)
                .and_then(|u| {
                    u.get("hashed_password")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .is_some_and(|hash| bcrypt::verify(&password, &hash).unwrap_or(false));
            return Err(refused(if disabled {
                format!("the user {email} is disabled; ask an admin (`medmesh users enable`)")
            } else {
                "the email or password is wrong (or the user has no password set)".to_owned()
            }));
        };
        let caller = crate::access::caller_of(&s, &user)
            .map_err(internal)?
            .map_err(refused)?;
        let user_id = caller.user_id.clone().unwrap_or_default();
        let now = chrono::Utc::now().timestamp_millis();
        let (token, session) = s
            .access()
            .sessions
            .issue(&user_id, &caller.name, hours, now)
            .map_err(internal)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({
                "token": token,
                "user": {"id": user_id, "email": caller.name, "role": caller.role.name()},
                "expires_at": medmesh_protocol::record::format_timestamp(session.expires_at),
            })),
        ))
    })
    .await
}

fn internal(err: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{err:#}"), "a sign-in failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the sign-in could not be completed; try again",
    )
}

/// `DELETE /v1/sessions/current`: signs the request's token out.
pub async fn close(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let Some(Credential::Bearer(token)) = credential(&headers) else {
        return Err(ApiError::bad_request(
            "no_session",
            "this request was not made with a session token, so there is none to sign out",
        ));
    };
    let s = state.clone();
    let ended = blocking(move || s.access().sessions.revoke(&token).map_err(internal)).await?;
    Ok(Json(json!({"signed_out": ended})))
}

/// `GET /v1/me`: the caller, their role and what they may do.
pub async fn me(Extension(caller): Extension<Caller>) -> Json<Value> {
    let may: Vec<&str> = Permission::ALL
        .iter()
        .filter(|p| caller.allows(**p, None))
        .map(|p| p.name())
        .collect();
    Json(json!({
        "user": caller.name,
        "user_id": caller.user_id,
        "role": caller.role.name(),
        "permissions": may,
    }))
}
