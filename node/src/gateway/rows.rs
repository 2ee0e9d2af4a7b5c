//! Rows between the mesh and the Hikma cloud: the cloud's value forms turned into the
//! mesh's (and back), and the comparison the three-way merge rests on.

use medmesh_protocol::record::Fields;
use medmesh_protocol::schema::CollectionSpec;
use serde_json::Value;

use crate::forms::{app_value, stored_value};

/// Columns the cloud keeps for itself; never stored in the mesh, never compared.
pub const CLOUD_ONLY: [&str; 2] = ["last_modified", "server_created_at"];
/// Columns that say when, not what: a row that differs only in these is the same row.
const STAMPS: [&str; 4] = [
    "updated_at",
    "last_modified",
    "server_created_at",
    "deleted_at",
];

/// A row as the mesh stores it, from the cloud's form (ISO timestamps, dates as
/// midnights in the cloud's time zone, decimals and numbers as text, JSON as objects)
/// or the app's (epoch milliseconds, JSON as text).
pub fn normalize(spec: Option<&CollectionSpec>, row: &Fields) -> Fields {
    let mut out = Fields::new();
    for (name, value) in row {
        if name.starts_with('_') || CLOUD_ONLY.contains(&name.as_str()) {
            continue;
        }
        let ty = spec.and_then(|s| s.field(name)).map(|f| f.ty);
        out.insert(name.clone(), stored_value(ty, value.clone()));
    }
    out
}

/// The columns of `new` whose values differ from `old`'s (a column `old` lacks is
/// null there), when-stamps left out. Columns only `old` has do not count: the cloud
/// drops columns it does not know, and their absence is no change.
pub fn changed_in<'a>(new: &'a Fields, old: &Fields) -> Vec<&'a str> {
    let null = Value::Null;
    new.iter()
        .filter(|(name, value)| {
            !STAMPS.contains(&name.as_str())
                && name.as_str() != "id"
                && !same_value(value, old.get(name.as_str()).unwrap_or(&null))
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

/// Equal values, numbers compared as numbers (`5` and `5.0` are the same dose).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A stored row in the form the app (and so the cloud) takes on a push.
pub fn to_push_form(spec: Option<&CollectionSpec>, row: &Fields) -> Fields {
    row.iter()
        .filter(|(name, _)| !name.starts_with('_') && !CLOUD_ONLY.contains(&name.as_str()))
        .map(|(name, value)| {
            let ty = spec.and_then(|s| s.field(name)).map(|f| f.ty);
            (name.clone(), app_value(ty, value.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Fields {
        match value {
            Value::Object(map) => map,
            _ => Fields::new(),
        }
    }

    #[test]
    fn cloud_and_app_forms_normalize_alike() {
        let schema = medmesh_protocol::Schema::hikma();
        let spec = schema.collection("patients");
        let cloud = fields(json!({
            "id": "x", "given_name": "Amina", "date_of_birth": "1992-03-04T21:00:00.000Z",
            "updated_at": "2024-05-06T12:00:00.000Z", "metadata": {"a": 1},
            "last_modified": "2024-05-06T12:00:00.000Z"
        }));
        let app = fields(json!({
            "id": "x", "given_name": "Amina", "date_of_birth": "1992-03-05",
            "updated_at": 1_715_000_000_000i64, "metadata": "{\"a\":1}"
        }));
        let a = normalize(spec, &cloud);
        let b = normalize(spec, &app);
        assert!(!a.contains_key("last_modified"));
        assert_eq!(a["date_of_birth"], json!("1992-03-05"));
        assert!(changed_in(&a, &b).is_empty(), "{:?}", changed_in(&a, &b));
        let mut c = b.clone();
        c.insert("hometown".into(), json!("Gulu"));
        assert_eq!(changed_in(&c, &a), vec!["hometown"]);
        // A column the cloud dropped is no change.
        assert!(changed_in(&a, &c).is_empty());
    }
}
