//! Tests of the parent module.
use super::*;
use proptest::prelude::*;
use serde_json::json;

const PATIENT_ID: &str = "0190f3a2-6c1e-7d4b-9a3e-5b2c8f1d0e47";
const CLINIC_ID: &str = "0190f3a2-6c1e-7d4b-9a3e-5b2c8f1d0e48";

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("test value is not an object: {other}"),
    }
}

fn hikma(collection: &str) -> CollectionSpec {
    Schema::hikma()
        .collection(collection)
        .cloned()
        .expect("built-in collection")
}

/// A patient as the Hikma mobile app pushes it (WatermelonDB raw record).
fn app_patient() -> Map<String, Value> {
    object(json!({
        "id": PATIENT_ID,
        "given_name": "Amina",
        "surname": "Haddad",
        "date_of_birth": "1987-03-14",
        "citizenship": "Syrian",
        "hometown": "Aleppo",
        "phone": "+961 70 123 456",
        "sex": "female",
        "camp": "",
        "additional_data": "{}",
        "metadata": "{\"source\":\"registration\"}",
        "photo_url": "",
        "image_timestamp": 0,
        "government_id": "",
        "external_patient_id": "",
        "primary_clinic_id": CLINIC_ID,
        "last_modified_by": null,
        "is_deleted": false,
        "deleted_at": null,
        "created_at": 1715000000000_i64,
        "updated_at": 1715000000123_i64,
        "_status": "created",
        "_changed": ""
    }))
}

#[test]
fn every_api_table_is_built_in_with_the_common_fields() {
    let schema = Schema::hikma();
    let names: Vec<&str> = schema.collections().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), 20);
    for name in [
        "patients",
        "patient_additional_attributes",
        "clinics",
        "users",
        "visits",
        "events",
        "event_forms",
        "registration_forms",
        "appointments",
        "prescriptions",
        "prescription_items",
        "patient_vitals",
        "patient_problems",
        "clinic_departments",
        "drug_catalogue",
        "clinic_inventory",
        "dispensing_records",
        "inventory_transactions",
        "user_clinic_permissions",
        "app_config",
    ] {
        let spec = schema.collection(name).expect(name);
        assert!(spec.builtin);
        let first: Vec<&str> = spec
            .fields
            .iter()
            .take(5)
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(first, COMMON_FIELDS);
        assert!(
            spec.field("id")
                .is_some_and(|f| f.required && f.ty == FieldType::Id)
        );
        assert!(spec.field("updated_at").is_some_and(|f| f.index.is_none()));
        let mut seen = std::collections::BTreeSet::new();
        assert!(
            spec.fields.iter().all(|f| seen.insert(f.name.as_str())),
            "{name}"
        );
    }
    assert_eq!(
        schema
            .collection("event_forms")
            .map(|c| c.indexed_fields().count()),
        Some(0)
    );
    let patients = hikma("patients");
    let indexed: Vec<(&str, IndexKind)> = patients
        .indexed_fields()
        .filter_map(|f| Some((f.name.as_str(), f.index?)))
        .collect();
    assert_eq!(
        indexed,
        [
            ("given_name", IndexKind::Prefix),
            ("surname", IndexKind::Prefix),
            ("phone", IndexKind::Exact),
            ("government_id", IndexKind::Exact),
            ("external_patient_id", IndexKind::Exact),
            ("primary_clinic_id", IndexKind::Exact),
        ]
    );
}

#[test]
fn accepts_a_patient_from_the_app_and_from_the_cloud() {
    let patients = hikma("patients");
    assert_eq!(patients.validate_record(&app_patient()), Ok(()));

    let pulled = object(json!({
        "id": PATIENT_ID,
        "given_name": "Amina",
        "surname": "Haddad",
        "date_of_birth": "1987-03-14T00:00:00.000Z",
        "additional_data": {"blood_type": "O+"},
        "metadata": {},
        "primary_clinic_id": null,
        "is_deleted": false,
        "created_at": "2024-05-06T12:53:20.000Z",
        "updated_at": "2024-05-06T12:53:20.123+00:00",
        "last_modified": "2024-05-06 12:53:20.5",
        "server_created_at": "2024-05-06T12:53:21Z"
    }));
    assert_eq!(patients.validate_record(&pulled), Ok(()));
}

#[test]
fn refuses_a_bad_date_naming_the_field() {
    let mut patient = app_patient();
    patient.insert("date_of_birth".into(), json!("14/03/1987"));
    let err = hikma("patients")
        .validate_record(&patient)
        .expect_err("bad date");
    assert_eq!(err.field(), "date_of_birth");
    assert_eq!(
        err.to_string(),
        "field `date_of_birth` of patients must be a date (\"YYYY-MM-DD\", an RFC 3339 \
         timestamp or epoch milliseconds), but got a string \"14/03/1987\""
    );
    patient.insert("date_of_birth".into(), json!("1987-02-30"));
    assert!(hikma("patients").validate_record(&patient).is_err());
}

#[test]
fn refuses_a_string_where_an_int_is_expected() {
    let item = object(json!({
        "id": PATIENT_ID,
        "prescription_id": CLINIC_ID,
        "quantity_prescribed": "30",
    }));
    let err = hikma("prescription_items")
        .validate_record(&item)
        .expect_err("string for int");
    assert_eq!(
        err,
        SchemaError::InvalidField {
            collection: "prescription_items".into(),
            field: "quantity_prescribed".into(),
            expected: "an integer",
            found: "a string \"30\"".into(),
        }
    );
    let float =
        object(json!({"id": PATIENT_ID, "prescription_id": CLINIC_ID, "refills_used": 1.5}));
    let err = hikma("prescription_items")
        .validate_record(&float)
        .expect_err("float for int");
    assert_eq!(err.field(), "refills_used");
    assert!(err.to_string().ends_with("but got the number 1.5"), "{err}");
}

#[test]
fn refuses_a_missing_or_null_required_field() {
    let visit = object(json!({"id": PATIENT_ID, "clinic_id": CLINIC_ID}));
    let err = hikma("visits")
        .validate_record(&visit)
        .expect_err("no patient_id");
    assert_eq!(
        err,
        SchemaError::MissingField {
            collection: "visits".into(),
            field: "patient_id".into()
        }
    );
    assert_eq!(err.to_string(), "field `patient_id` is required in visits");

    let visit = object(json!({"id": PATIENT_ID, "patient_id": null}));
    assert_eq!(
        hikma("visits")
            .validate_record(&visit)
            .map_err(|e| e.field().to_owned()),
        Err("patient_id".to_owned())
    );
    let visit = object(json!({"id": PATIENT_ID, "patient_id": ""}));
    assert!(hikma("visits").validate_record(&visit).is_err());
    assert_eq!(
        hikma("patients")
            .validate_record(&Map::new())
            .map_err(|e| e.field().to_owned()),
        Err("id".to_owned())
    );
}

#[test]
fn refuses_an_id_that_is_not_a_uuid() {
    let mut patient = app_patient();
    patient.insert("id".into(), json!("patient-42"));
    let err = hikma("patients")
        .validate_record(&patient)
        .expect_err("bad id");
    assert_eq!(
        err.to_string(),
        "field `id` of patients must be a UUID string, but got a string \"patient-42\""
    );
    patient.insert("id".into(), json!(42));
    let err = hikma("patients")
        .validate_record(&patient)
        .expect_err("numeric id");
    assert!(err.to_string().ends_with("but got the number 42"), "{err}");
    patient.insert("id".into(), json!("0190f3a26c1e7d4b9a3e5b2c8f1d0e47"));
    assert!(hikma("patients").validate_record(&patient).is_err());
    patient.insert("id".into(), json!("0190F3A2-6C1E-7D4B-9A3E-5B2C8F1D0E47"));
    assert_eq!(hikma("patients").validate_record(&patient), Ok(()));
}

#[test]
fn checks_each_field_type() {
    let cases: &[(&str, &str, Value, bool)] = &[
        ("drug_catalogue", "sale_price", json!("12.50"), true),
        ("drug_catalogue", "sale_price", json!(12.5), true),
        ("drug_catalogue", "sale_price", json!(""), true),
        ("drug_catalogue", "sale_price", json!("-1e3"), true),
        ("drug_catalogue", "sale_price", json!("12,50"), false),
        ("drug_catalogue", "sale_price", json!("NaN"), false),
        ("drug_catalogue", "sale_price", json!("."), false),
        ("drug_catalogue", "is_active", json!(1), false),
        ("drug_catalogue", "is_active", json!(true), true),
        ("clinics", "attributes", json!(["rural", "mobile"]), true),
        ("clinics", "attributes", json!(["rural", 3]), false),
        ("clinics", "attributes", json!("rural"), false),
        (
            "visits",
            "check_in_timestamp",
            json!(1715000000000_i64),
            true,
        ),
        ("visits", "check_in_timestamp", json!(-1), false),
        (
            "visits",
            "check_in_timestamp",
            json!(1715000000000.5),
            false,
        ),
        ("visits", "check_in_timestamp", json!("yesterday"), false),
        ("visits", "clinic_id", json!(""), true),
        ("visits", "clinic_id", json!(7), false),
        ("patient_problems", "onset_date", json!(-86_400_000), true),
        ("patient_problems", "onset_date", json!("2020-01-31"), true),
        ("patient_problems", "onset_date", json!("2020-1-31"), false),
        ("patient_vitals", "temperature_celsius", json!(37.2), true),
        (
            "patient_vitals",
            "temperature_celsius",
            json!("37.2"),
            false,
        ),
        ("patient_vitals", "heart_rate", json!(72), true),
        ("patient_vitals", "heart_rate", json!(u64::MAX), false),
        ("events", "form_data", json!("[{\"name\":\"cough\"}]"), true),
        ("events", "form_data", json!([{"name": "cough"}]), true),
        ("patients", "given_name", json!(12), false),
        ("patients", "given_name", json!(null), true),
    ];
    for (collection, field, value, ok) in cases {
        let mut record = object(json!({"id": PATIENT_ID, "patient_id": PATIENT_ID}));
        record.insert((*field).into(), value.clone());
        let result = hikma(collection).validate_record(&record);
        assert_eq!(
            result.is_ok(),
            *ok,
            "{collection}.{field} = {value}: {result:?}"
        );
        if let Err(err) = result {
            assert_eq!(err.field(), *field);
        }
    }
}

#[test]
fn describes_values_briefly() {
    assert_eq!(describe_value(&json!({"a": 1})), "an object");
    assert_eq!(describe_value(&json!([1, 2])), "an array of 2 items");
    assert_eq!(describe_value(&json!(false)), "the boolean false");
    assert_eq!(describe_value(&json!("")), "an empty string");
    let long = "é".repeat(100);
    let shown = describe_value(&json!(long));
    assert_eq!(
        shown,
        format!("a string \"{}…\"", "é".repeat(MAX_SHOWN_CHARS))
    );
}

#[test]
fn validates_patches() {
    let visits = hikma("visits");
    let ok = object(json!({"provider_name": "Dr. Saleh", "check_in_timestamp": 1715000000000_i64}));
    assert_eq!(visits.validate_patch(&ok), Ok(()));
    assert_eq!(
        visits.validate_patch(&object(json!({"unknown_column": [1]}))),
        Ok(())
    );
    assert_eq!(
        visits.validate_patch(&object(json!({"clinic_id": null}))),
        Ok(())
    );

    let null_required = object(json!({"patient_id": null}));
    assert_eq!(
        visits.validate_patch(&null_required),
        Err(SchemaError::MissingField {
            collection: "visits".into(),
            field: "patient_id".into()
        })
    );
    let bad_type = object(json!({"check_in_timestamp": true}));
    assert_eq!(
        visits
            .validate_patch(&bad_type)
            .map_err(|e| e.field().to_owned()),
        Err("check_in_timestamp".to_owned())
    );
    let bad_id = object(json!({"id": "not-a-uuid"}));
    assert_eq!(
        visits
            .validate_patch(&bad_id)
            .map_err(|e| e.field().to_owned()),
        Err("id".to_owned())
    );
    assert_eq!(
        visits.validate_patch(&object(json!({"id": PATIENT_ID}))),
        Ok(())
    );
}

const LAB_REPORTS: &str = r#"{"collections": [{"name": "lab_reports", "fields": [
    {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
    {"name": "test_name", "type": "string", "index": "prefix"},
    {"name": "result_value", "type": "number"},
    {"name": "reported_at", "type": "timestamp"}]}]}"#;

#[test]
fn extends_the_schema_from_a_file() {
    let mut schema = Schema::hikma();
    schema
        .extend_from_json(LAB_REPORTS, "lab.json")
        .expect("valid schema file");
    let labs = schema.collection("lab_reports").expect("added");
    assert!(!labs.builtin);
    assert_eq!(labs.fields.len(), 9);
    assert_eq!(
        labs.field("result_value"),
        Some(&FieldSpec {
            name: "result_value".into(),
            ty: FieldType::Number,
            required: false,
            index: None
        })
    );
    let indexed: Vec<(&str, Option<IndexKind>)> = labs
        .indexed_fields()
        .map(|f| (f.name.as_str(), f.index))
        .collect();
    assert_eq!(
        indexed,
        [
            ("patient_id", Some(IndexKind::Exact)),
            ("test_name", Some(IndexKind::Prefix))
        ]
    );

    let report = object(json!({
        "id": PATIENT_ID, "patient_id": PATIENT_ID, "test_name": "HbA1c",
        "result_value": 6.1, "reported_at": "2024-05-06T12:00:00Z"
    }));
    assert_eq!(labs.validate_record(&report), Ok(()));
    let bad = object(json!({"id": PATIENT_ID, "patient_id": PATIENT_ID, "result_value": "high"}));
    let err = labs.validate_record(&bad).expect_err("string for number");
    assert_eq!(err.field(), "result_value");
    assert!(
        err.to_string().contains("of lab_reports must be a number"),
        "{err}"
    );
    let missing = object(json!({"id": PATIENT_ID}));
    assert_eq!(
        labs.validate_record(&missing)
            .map_err(|e| e.field().to_owned()),
        Err("patient_id".to_owned())
    );

    let spec = serde_json::to_value(labs.field("test_name")).expect("serializes");
    assert_eq!(
        spec,
        json!({"name": "test_name", "type": "string", "required": false, "index": "prefix"})
    );

    let err = schema
        .extend_from_json(LAB_REPORTS, "again.json")
        .expect_err("defined twice");
    assert!(
        err.to_string()
            .contains("already defined by an earlier schema file"),
        "{err}"
    );
    let empty = r#"{"collections": [{"name": "referrals"}]}"#;
    schema
        .extend_from_json(empty, "referrals.json")
        .expect("fields may be left out");
    assert_eq!(
        schema.collection("referrals").map(|c| c.fields.len()),
        Some(5)
    );
}

fn file_error(text: &str) -> SchemaFileError {
    Schema::hikma()
        .extend_from_json(text, "extra.json")
        .expect_err("schema file should be refused")
}

fn invalid_message(text: &str) -> String {
    match file_error(text) {
        SchemaFileError::Invalid {
            source_name,
            message,
        } => {
            assert_eq!(source_name, "extra.json");
            message
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

fn one_field(field: &str) -> String {
    format!(r#"{{"collections": [{{"name": "lab_reports", "fields": [{field}]}}]}}"#)
}

#[test]
fn reports_json_errors_with_line_and_column() {
    match file_error("{\"collections\": [\n  {\"name\": \"x\",]\n}") {
        SchemaFileError::Json {
            source_name,
            line,
            column,
            message,
        } => {
            assert_eq!((source_name.as_str(), line), ("extra.json", 2));
            assert!(column > 1);
            assert!(!message.contains("at line"), "{message}");
        }
        other => panic!("expected a Json error, got {other:?}"),
    }
    let err = file_error(&one_field(r#"{"name": "x", "typ": "string"}"#));
    assert!(matches!(err, SchemaFileError::Json { .. }));
    assert!(err.to_string().contains("unknown field `typ`"), "{err}");
    assert!(
        err.to_string()
            .starts_with("schema file extra.json, line 1, column"),
        "{err}"
    );
    let err = file_error(r#"{"collections": [], "version": 2}"#);
    assert!(err.to_string().contains("unknown field `version`"), "{err}");
    let err = file_error(r#"{"tables": []}"#);
    assert!(err.to_string().contains("unknown field `tables`"), "{err}");
}

#[test]
fn refuses_bad_declarations_saying_what_to_fix() {
    let message = invalid_message(r#"{"collections": [{"name": "Lab Reports"}]}"#);
    assert!(
        message.contains("collection name `Lab Reports` is not valid"),
        "{message}"
    );

    let message = invalid_message(r#"{"collections": [{"name": "patients"}]}"#);
    assert!(
        message.contains("`patients` is a built-in Hikma Health collection"),
        "{message}"
    );

    let message = invalid_message(r#"{"collections": [{"name": "a"}, {"name": "a"}]}"#);
    assert!(
        message.contains("collection `a` is declared twice"),
        "{message}"
    );

    let message = invalid_message(&one_field(r#"{"name": "Result", "type": "number"}"#));
    assert!(
        message.contains("field `Result`: the name is not valid"),
        "{message}"
    );

    let message = invalid_message(&one_field(r#"{"name": "result", "type": "float"}"#));
    assert!(
        message.contains("unknown type `float`; use one of: string, id, int"),
        "{message}"
    );

    let message = invalid_message(&one_field(
        r#"{"name": "r", "type": "id", "index": "hash"}"#,
    ));
    assert!(message.contains("unknown index `hash`"), "{message}");

    let message = invalid_message(&one_field(
        r#"{"name": "r", "type": "json", "index": "exact"}"#,
    ));
    assert!(message.contains("cannot be indexed"), "{message}");

    let message = invalid_message(&one_field(
        r#"{"name": "r", "type": "int", "index": "prefix"}"#,
    ));
    assert!(message.contains("use `exact` instead"), "{message}");

    let message = invalid_message(&one_field(
        r#"{"name": "r", "type": "int"}, {"name": "r", "type": "string"}"#,
    ));
    assert!(
        message.contains("collection `lab_reports`, field `r`: declared twice"),
        "{message}"
    );

    for common in COMMON_FIELDS {
        let message = invalid_message(&one_field(&format!(
            r#"{{"name": "{common}", "type": "timestamp"}}"#
        )));
        assert!(message.contains("is a common field"), "{message}");
    }

    // A refused file adds nothing, even the collections before the bad one.
    let mut schema = Schema::hikma();
    let text = r#"{"collections": [{"name": "good"}, {"name": "Bad"}]}"#;
    assert!(schema.extend_from_json(text, "extra.json").is_err());
    assert!(schema.collection("good").is_none());
}

#[test]
fn normalizes_index_values() {
    let prefix = |v: Value| index_value(&v, IndexKind::Prefix);
    let exact = |v: Value| index_value(&v, IndexKind::Exact);
    assert_eq!(
        prefix(json!("  Amina \t  HADDAD\n")),
        Some("amina haddad".into())
    );
    assert_eq!(prefix(json!("ÉLODIE")), Some("élodie".into()));
    assert_eq!(
        exact(json!(" +961 70 123 456")),
        Some(" +961 70 123 456".into())
    );
    assert_eq!(exact(json!(42)), Some("42".into()));
    assert_eq!(prefix(json!(2.5)), Some("2.5".into()));
    assert_eq!(exact(json!(true)), Some("true".into()));
    assert_eq!(exact(json!(null)), None);
    assert_eq!(exact(json!({"a": 1})), None);
    assert_eq!(prefix(json!(["a"])), None);
    assert_eq!(exact(json!("")), None);
    assert_eq!(prefix(json!("   ")), None);
}

#[test]
fn collection_names() {
    for ok in ["a", "patients", "lab_reports_v2", &"a".repeat(63)] {
        assert!(is_valid_collection_name(ok), "{ok}");
    }
    for bad in [
        "",
        "_a",
        "1a",
        "Lab",
        "lab-reports",
        "lab reports",
        "é",
        &"a".repeat(64),
    ] {
        assert!(!is_valid_collection_name(bad), "{bad}");
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn a_json_field_accepts_any_value(value in any_json()) {
        let events = hikma("events");
        let record = object(json!({"id": PATIENT_ID, "patient_id": PATIENT_ID, "form_data": value.clone()}));
        prop_assert_eq!(events.validate_record(&record), Ok(()));
        let patch = object(json!({"metadata": value}));
        prop_assert_eq!(events.validate_patch(&patch), Ok(()));
    }

    #[test]
    fn an_int_field_accepts_every_i64(n in any::<i64>()) {
        let record = object(json!({
            "id": PATIENT_ID, "stock_item_id": PATIENT_ID,
            "transaction_type": "adjustment", "quantity_change": n,
        }));
        prop_assert_eq!(hikma("inventory_transactions").validate_record(&record), Ok(()));
    }

    #[test]
    fn validation_never_panics(value in any_json(), field in "[a-z_]{1,12}") {
        let schema = Schema::hikma();
        let record = object(json!({"id": PATIENT_ID, "patient_id": value.clone()}));
        let patch = object(json!({ field: value }));
        for collection in schema.collections() {
            let _ = collection.validate_record(&record);
            let _ = collection.validate_patch(&patch);
        }
    }

    #[test]
    fn prefix_keys_are_already_normalized(s in "\\PC{0,30}") {
        if let Some(key) = index_value(&Value::String(s), IndexKind::Prefix) {
            prop_assert_eq!(index_value(&Value::String(key.clone()), IndexKind::Prefix), Some(key));
        }
    }
}
