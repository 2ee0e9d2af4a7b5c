//! The value forms of the Hikma sync API, one place for the node's two sides of it
//! (the app's sync in `mobile`, the gateway): the app stores timestamps as epoch
//! milliseconds, JSON columns as text and dates as `YYYY-MM-DD`; the cloud answers ISO
//! timestamps, dates as midnights in its own time zone, decimals as text; the mesh
//! stores RFC 3339 timestamps, JSON as JSON and dates as `YYYY-MM-DD`.

use chrono::{NaiveDate, TimeZone, Utc};
use medmesh_protocol::record;
use medmesh_protocol::schema::FieldType;
use serde_json::Value;

/// A stored value in the app's form.
pub fn app_value(ty: Option<FieldType>, value: Value) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (Some(FieldType::Timestamp), value) => match record::timestamp_ms(&value) {
            Some(ms) => Value::from(ms),
            None => value,
        },
        (Some(FieldType::Date), value) => match date_of(&value) {
            Some(date) => Value::from(date.format("%Y-%m-%d").to_string()),
            None => value,
        },
        // WatermelonDB columns hold strings, numbers and booleans: JSON goes as text.
        (_, value @ (Value::Object(_) | Value::Array(_))) => Value::from(value.to_string()),
        (Some(FieldType::Json), value @ (Value::Number(_) | Value::Bool(_))) => {
            Value::from(value.to_string())
        }
        (_, value) => value,
    }
}

/// A value (in the cloud's form or the app's) in the form the mesh stores: timestamps
/// as RFC 3339 (`0` from the app is none), dates as `YYYY-MM-DD`, numbers and flags
/// given as text as numbers and flags, JSON given as text as JSON.
pub fn stored_value(ty: Option<FieldType>, value: Value) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (Some(FieldType::Timestamp), value) => match record::timestamp_ms(&value) {
            Some(0) if value.is_number() => Value::Null,
            Some(ms) => Value::from(record::format_timestamp(ms)),
            None => value,
        },
        (Some(FieldType::Date), value) => match date_of(&value) {
            Some(date) => Value::from(date.format("%Y-%m-%d").to_string()),
            None => value,
        },
        (Some(FieldType::Int), Value::String(text)) => match text.trim().parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => match text.trim().parse::<f64>() {
                Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
                _ => Value::String(text),
            },
        },
        (Some(FieldType::Number | FieldType::Decimal), Value::String(text)) => {
            match text.trim().parse::<f64>() {
                Ok(f) => serde_json::Number::from_f64(f).map_or(Value::String(text), Value::Number),
                Err(_) => Value::String(text),
            }
        }
        (Some(FieldType::Bool), Value::String(text)) => match text.as_str() {
            "true" | "t" => Value::Bool(true),
            "false" | "f" => Value::Bool(false),
            _ => Value::String(text),
        },
        (Some(FieldType::Json | FieldType::StringList), Value::String(text)) => {
            match serde_json::from_str::<Value>(&text) {
                Ok(parsed @ (Value::Object(_) | Value::Array(_))) => parsed,
                _ => Value::String(text),
            }
        }
        (_, value) => value,
    }
}

/// The calendar date of a date value (text, or a timestamp rounded to the nearest
/// midnight, as the cloud's dates come back shifted by its time zone).
pub fn date_of(value: &Value) -> Option<NaiveDate> {
    if let Some(text) = value.as_str()
        && let Some(date) = text
            .get(..10)
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        && text.len() == 10
    {
        return Some(date);
    }
    let ms = record::timestamp_ms(value)?;
    let rounded = (ms + 12 * 3_600_000).div_euclid(86_400_000) * 86_400_000;
    Utc.timestamp_millis_opt(rounded)
        .single()
        .map(|t| t.date_naive())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_cross_to_the_app_and_back() {
        let ts = Some(FieldType::Timestamp);
        let stored = Value::from(record::format_timestamp(1_715_000_000_123));
        let app = app_value(ts, stored.clone());
        assert_eq!(app, json!(1_715_000_000_123i64));
        assert_eq!(stored_value(ts, app), stored);
        assert_eq!(stored_value(ts, json!(0)), Value::Null);
        let meta = json!({"a": [1, 2]});
        let text = app_value(Some(FieldType::Json), meta.clone());
        assert_eq!(text, json!("{\"a\":[1,2]}"));
        assert_eq!(stored_value(Some(FieldType::Json), text), meta);
        assert_eq!(
            app_value(Some(FieldType::Date), json!("1992-03-05")),
            json!("1992-03-05")
        );
        // A date the cloud sent as its midnight in UTC+3.
        assert_eq!(
            app_value(Some(FieldType::Date), json!("1992-03-04T21:00:00.000Z")),
            json!("1992-03-05")
        );
    }
}
