//! Pharmacy endpoints: `/v1/pharmacy/{restock,dispense,count,adjust}` (POST),
//! `/v1/pharmacy/{stock,alerts,verify}` and `/v1/drugs/search` (GET).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use medmesh_protocol::DocId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::records::{body_object, clinic_of};
use super::{ApiError, AppState, blocking};
use crate::access::{Caller, Permission};
use crate::pharmacy::{Pharmacy, PharmacyError};

impl From<PharmacyError> for ApiError {
    fn from(err: PharmacyError) -> Self {
        match err {
            PharmacyError::Invalid { field, message } => ApiError::invalid_field(field, message),
            PharmacyError::Store(err) => err.into(),
        }
    }
}

type Operation =
    fn(&Pharmacy, &serde_json::Map<String, Value>, Option<&str>) -> Result<Value, PharmacyError>;

async fn run(
    state: AppState,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
    permission: Permission,
    operation: Operation,
) -> Result<Json<Value>, ApiError> {
    let fields = body_object(body)?;
    caller.require(permission, clinic_of(&fields))?;
    let pharmacy = state.pharmacy();
    let answer =
        blocking(move || Ok(operation(&pharmacy, &fields, Some(caller.name.as_str()))?)).await?;
    Ok(Json(answer))
}

/// `POST /v1/pharmacy/restock`
pub async fn restock(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    run(
        state,
        caller,
        body,
        Permission::ManageStock,
        Pharmacy::restock,
    )
    .await
}

/// `POST /v1/pharmacy/dispense`
pub async fn dispense(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    run(
        state,
        caller,
        body,
        Permission::Dispense,
        Pharmacy::dispense,
    )
    .await
}

/// `POST /v1/pharmacy/count`
pub async fn count(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    run(
        state,
        caller,
        body,
        Permission::ManageStock,
        Pharmacy::count,
    )
    .await
}

/// `POST /v1/pharmacy/adjust`
pub async fn adjust(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    run(
        state,
        caller,
        body,
        Permission::ManageStock,
        Pharmacy::adjust,
    )
    .await
}

/// Filters of the stock and alert queries.
#[derive(Debug, Deserialize)]
pub struct StockParams {
    clinic_id: Option<String>,
    drug_id: Option<String>,
    within_days: Option<i64>,
    limit: Option<usize>,
    after: Option<String>,
}

/// Stock rows per page unless `limit` says otherwise.
const STOCK_PAGE: usize = 1000;
/// The most stock rows one page may carry.
const MAX_STOCK_PAGE: usize = 5000;

/// `GET /v1/pharmacy/stock?clinic_id=&drug_id=&limit=&after=`: stock rows by drug name
/// then expiry, a page at a time (`next` is the `after` of the next page, null at the
/// end).
pub async fn stock(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<StockParams>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadStock, params.clinic_id.as_deref())?;
    let limit = params.limit.unwrap_or(STOCK_PAGE);
    if !(1..=MAX_STOCK_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit must be between 1 and {MAX_STOCK_PAGE}"),
        ));
    }
    let after = match params.after.as_deref() {
        Some(text) => Some(text.parse::<DocId>().map_err(|_| {
            ApiError::bad_request(
                "bad_after",
                "`after` must be the `next` value of the previous page",
            )
        })?),
        None => None,
    };
    let pharmacy = state.pharmacy();
    let page = blocking(move || {
        Ok(pharmacy.stock_page(
            params.clinic_id.as_deref(),
            params.drug_id.as_deref(),
            after.as_ref(),
            limit,
        )?)
    })
    .await?;
    let (items, next) = page.ok_or_else(|| {
        ApiError::bad_request(
            "bad_after",
            "`after` is not a stock item of this listing; start again without it",
        )
    })?;
    Ok(Json(json!({ "items": items, "next": next })))
}

/// `GET /v1/pharmacy/alerts?clinic_id=&within_days=`
pub async fn alerts(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<StockParams>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadStock, params.clinic_id.as_deref())?;
    let pharmacy = state.pharmacy();
    let today = chrono::Utc::now().date_naive();
    let within = params.within_days.unwrap_or(90);
    let answer =
        blocking(move || Ok(pharmacy.alerts(params.clinic_id.as_deref(), within, today)?)).await?;
    Ok(Json(answer))
}

/// `GET /v1/pharmacy/verify`: stock items whose quantity differs from their movements.
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadStock, None)?;
    let pharmacy = state.pharmacy();
    Ok(Json(blocking(move || Ok(pharmacy.verify()?)).await?))
}

/// Parameters of the drug search.
#[derive(Debug, Deserialize)]
pub struct SearchParams {
    q: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/drugs/search?q=...&limit=N`: autocompletes drug names.
pub async fn search(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<SearchParams>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadReference, None)?;
    let q = params.q.unwrap_or_default();
    let limit = params.limit.unwrap_or(10).clamp(1, 100);
    let pharmacy = state.pharmacy();
    let hits = blocking(move || Ok(pharmacy.search_drugs(&q, limit)?)).await?;
    Ok(Json(json!({ "drugs": hits })))
}

/// Points of a level chart at most.
const LEVEL_POINTS: usize = 240;

/// Parameters of `GET /v1/pharmacy/levels`.
#[derive(Debug, Deserialize)]
pub struct LevelParams {
    stock_item_id: String,
}

/// `GET /v1/pharmacy/levels?stock_item_id=ID`: the stock item's level after each of its
/// movements, oldest first (at most 240 points, evenly spaced), for a chart.
pub async fn levels(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<LevelParams>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::ReadStock, None)?;
    let id: DocId = params.stock_item_id.parse().map_err(|_| {
        ApiError::bad_request(
            "bad_query",
            "stock_item_id must be a stock item's id (from GET /v1/pharmacy/stock)",
        )
    })?;
    let pharmacy = state.pharmacy();
    let answer = blocking(move || Ok(pharmacy.levels(&id, LEVEL_POINTS)?)).await?;
    Ok(Json(answer))
}
