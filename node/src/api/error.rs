//! Errors as the API answers them: `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use medmesh_storage::StoreError;
use serde_json::json;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What happened and what to do.
    pub message: String,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    /// The permission the caller lacks (403).
    pub permission: Option<&'static str>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            permission: None,
        }
    }

    /// 400 with a message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_field`, naming the field at fault.
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut error = Self::bad_request("invalid_field", message);
        error.field = Some(field.into());
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = json!(field);
        }
        if let Some(permission) = self.permission {
            error["permission"] = json!(permission);
        }
        (self.status, axum::Json(json!({ "error": error }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        let (status, code, field) = match &err {
            StoreError::DiskFull => (StatusCode::SERVICE_UNAVAILABLE, "disk_full", None),
            StoreError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None),
            StoreError::UnknownCollection(_) => (StatusCode::NOT_FOUND, "unknown_collection", None),
            StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            StoreError::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists", None),
            StoreError::Invalid(schema) => (
                StatusCode::BAD_REQUEST,
                "invalid_field",
                Some(schema.field().to_owned()),
            ),
            StoreError::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query", None),
            StoreError::CorruptDocument { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "damaged_record", None)
            }
            StoreError::CorruptDatabase { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "damaged_database", None)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error", None),
        };
        if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        }
        Self {
            status,
            code,
            message,
            field,
            permission: None,
        }
    }
}
