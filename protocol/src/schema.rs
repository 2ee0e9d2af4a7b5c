//! Record schema: which collections exist, which fields they have, and what a valid
//! record looks like.
//!
//! A **collection** is a named set of JSON records (a Hikma Health table such as
//! `patients`, or an extra collection declared in a schema file). Each collection lists
//! its known **fields** with a [`FieldType`], a `required` flag and an optional
//! [`IndexKind`]. Every collection has the [common fields](COMMON_FIELDS) `id` (a
//! required UUID string), `created_at`, `updated_at`, `deleted_at` (timestamps) and
//! `is_deleted` (bool).
//!
//! [`Schema::hikma`] holds the built-in collections: every table of the Hikma Health sync
//! API, plus medmesh's own `inventory_transactions` audit trail. A deployment may add
//! collections with [`Schema::extend_from_json`]; the file format is
//!
//! ```json
//! {"collections": [{"name": "lab_reports", "fields": [
//!     {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
//!     {"name": "test_name", "type": "string", "index": "prefix"},
//!     {"name": "result_value", "type": "number"}]}]}
//! ```
//!
//! # Validation
//!
//! Validation guards what medmesh stores without ever refusing a record the Hikma app
//! would write, so it is deliberately permissive:
//!
//! - Fields not in the schema are allowed and not checked (the cloud ignores unknown
//!   columns, and WatermelonDB adds `_status`/`_changed`).
//! - Only `id` and a few foreign keys are required; `null` is accepted for any other
//!   field.
//! - Values take the forms both sides of the sync use: timestamps as RFC 3339 strings
//!   (what the cloud sends) or epoch milliseconds (what the app stores), dates as
//!   `"YYYY-MM-DD"`, a timestamp or epoch milliseconds, decimals as numbers or numeric
//!   strings, JSON columns as anything (the app sends JSON text, the cloud objects).
//! - WatermelonDB writes `""` into string columns that were never set, so an empty
//!   string counts as "no value" in an optional `id`, `date` or `decimal` field.
//!
//! # Indexes
//!
//! Fields marked with an [`IndexKind`] are looked up by the storage layer with keys made
//! by [`index_value`]. `updated_at` is indexed by storage for every collection and is
//! not marked here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The fields every collection has; they are added automatically and may not be
/// declared in a schema file.
pub const COMMON_FIELDS: [&str; 5] = ["id", "created_at", "updated_at", "deleted_at", "is_deleted"];

/// Longest string shown in an error message before it is cut short.
const MAX_SHOWN_CHARS: usize = 40;

/// Type of a field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A JSON string.
    String,
    /// A reference to a record: a non-empty JSON string (the `id` field itself must be a
    /// hyphenated UUID).
    Id,
    /// A JSON integer that fits in an `i64` (not a float, not a string).
    Int,
    /// Any JSON number.
    Number,
    /// A JSON number, or a string holding a decimal number such as `"12.50"` (how the
    /// cloud and the app carry money and doses).
    Decimal,
    /// `true` or `false`.
    Bool,
    /// An RFC 3339 / ISO 8601 date-time string, or non-negative epoch milliseconds.
    Timestamp,
    /// A calendar date: `"YYYY-MM-DD"`, an RFC 3339 timestamp, or epoch milliseconds
    /// (the app stores some dates as numbers).
    Date,
    /// Any JSON value (the app sends JSON columns as text, the cloud as objects).
    Json,
    /// A JSON array of strings.
    StringList,
}

impl FieldType {
    /// Every field type, in declaration order.
    pub const ALL: [FieldType; 10] = [
        FieldType::String,
        FieldType::Id,
        FieldType::Int,
        FieldType::Number,
        FieldType::Decimal,
        FieldType::Bool,
        FieldType::Timestamp,
        FieldType::Date,
        FieldType::Json,
        FieldType::StringList,
    ];

    /// The name used for this type in schema files, e.g. `"string_list"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Id => "id",
            FieldType::Int => "int",
            FieldType::Number => "number",
            FieldType::Decimal => "decimal",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Date => "date",
            FieldType::Json => "json",
            FieldType::StringList => "string_list",
        }
    }

    /// The type whose schema-file name is `name`.
    fn from_name(name: &str) -> Option<FieldType> {
        FieldType::ALL.into_iter().find(|ty| ty.as_str() == name)
    }

    /// What a value of this type looks like, for error messages.
    pub fn description(self) -> &'static str {
        match self {
            FieldType::String => "a string",
            FieldType::Id => "a non-empty id string",
            FieldType::Int => "an integer",
            FieldType::Number => "a number",
            FieldType::Decimal => "a decimal number (a number or a numeric string)",
            FieldType::Bool => "true or false",
            FieldType::Timestamp => "a timestamp (an RFC 3339 string or epoch milliseconds)",
            FieldType::Date => {
                "a date (\"YYYY-MM-DD\", an RFC 3339 timestamp or epoch milliseconds)"
            }
            FieldType::Json => "any JSON value",
            FieldType::StringList => "an array of strings",
        }
    }

    /// Whether a non-null `value` has this type. `null` is never accepted here; whether a
    /// field may be null is up to [`FieldSpec::required`].
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            FieldType::String => value.is_string(),
            FieldType::Id => value.as_str().is_some_and(|s| !s.is_empty()),
            FieldType::Int => value.is_i64(),
            FieldType::Number => value.is_number(),
            FieldType::Decimal => value.is_number() || value.as_str().is_some_and(is_decimal_text),
            FieldType::Bool => value.is_boolean(),
            FieldType::Timestamp => match value {
                Value::String(s) => is_timestamp_text(s),
                _ => value.as_i64().is_some_and(|ms| ms >= 0),
            },
            FieldType::Date => match value {
                Value::String(s) => is_date_text(s) || is_timestamp_text(s),
                _ => value.is_i64(),
            },
            FieldType::Json => !value.is_null(),
            FieldType::StringList => value
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_string)),
        }
    }

    /// Types stored in WatermelonDB string columns, where `""` means "never set".
    fn empty_means_unset(self) -> bool {
        matches!(self, FieldType::Id | FieldType::Date | FieldType::Decimal)
    }
}

/// How a field is indexed for lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IndexKind {
    /// Look up by the exact value (ids, phone numbers, barcodes, statuses).
    Exact,
    /// Look up by a case- and whitespace-insensitive prefix (names).
    Prefix,
}

impl IndexKind {
    /// The index kind whose schema-file name is `name`.
    fn from_name(name: &str) -> Option<IndexKind> {
        match name {
            "exact" => Some(IndexKind::Exact),
            "prefix" => Some(IndexKind::Prefix),
            _ => None,
        }
    }
}

/// One field of a collection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldSpec {
    /// The field's name (a JSON key of the record).
    pub name: String,
    /// The type its value must have.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Whether a record must have it, with a non-null value.
    pub required: bool,
    /// How it is indexed, if at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexKind>,
}

impl FieldSpec {
    fn new(name: &str, ty: FieldType, required: bool, index: Option<IndexKind>) -> FieldSpec {
        FieldSpec {
            name: name.to_owned(),
            ty,
            required,
            index,
        }
    }
}

/// A collection: its name and fields (the common fields first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectionSpec {
    /// The collection's name, e.g. `patients`.
    pub name: String,
    /// Its fields: the [common fields](COMMON_FIELDS), then its own.
    pub fields: Vec<FieldSpec>,
    /// Whether it is a built-in Hikma Health collection (not from a schema file).
    pub builtin: bool,
}

impl CollectionSpec {
    /// A collection with the common fields followed by `own`.
    fn with_common_fields(name: &str, own: Vec<FieldSpec>, builtin: bool) -> CollectionSpec {
        let mut fields = vec![
            FieldSpec::new("id", FieldType::Id, true, None),
            FieldSpec::new("created_at", FieldType::Timestamp, false, None),
            FieldSpec::new("updated_at", FieldType::Timestamp, false, None),
            FieldSpec::new("deleted_at", FieldType::Timestamp, false, None),
            FieldSpec::new("is_deleted", FieldType::Bool, false, None),
        ];
        fields.extend(own);
        CollectionSpec {
            name: name.to_owned(),
            fields,
            builtin,
        }
    }

    /// The field called `name`, if the collection has one.
    pub fn field(&self, name: &str) -> Option<&FieldSpec> {
        self.fields.iter().find(|field| field.name == name)
    }

    /// The fields that have an index, in declaration order.
    pub fn indexed_fields(&self) -> impl Iterator<Item = &FieldSpec> {
        self.fields.iter().filter(|field| field.index.is_some())
    }

    /// Validate a whole record (create or full replace): required fields present and not
    /// null, every known field type-checked. Unknown fields are allowed and not checked.
    pub fn validate_record(&self, record: &Map<String, Value>) -> Result<(), SchemaError> {
        for field in &self.fields {
            match record.get(&field.name) {
                Some(value) => self.check_field(field, value)?,
                None if field.required => return Err(self.missing(field)),
                None => {}
            }
        }
        Ok(())
    }

    /// Validate a partial update: only the given fields are type-checked, and a required
    /// field may not be set to null. An `id` in the patch must be a valid UUID; the caller
    /// must check that it equals the record's current id.
    pub fn validate_patch(&self, patch: &Map<String, Value>) -> Result<(), SchemaError> {
        for (name, value) in patch {
            if let Some(field) = self.field(name) {
                self.check_field(field, value)?;
            }
        }
        Ok(())
    }

    /// Check one present value of `field`.
    fn check_field(&self, field: &FieldSpec, value: &Value) -> Result<(), SchemaError> {
        if value.is_null() {
            return if field.required {
                Err(self.missing(field))
            } else {
                Ok(())
            };
        }
        let (valid, expected) = if field.name == "id" {
            (value.as_str().is_some_and(is_uuid_text), "a UUID string")
        } else {
            let unset =
                !field.required && field.ty.empty_means_unset() && value.as_str() == Some("");
            (unset || field.ty.accepts(value), field.ty.description())
        };
        if valid {
            Ok(())
        } else {
            Err(SchemaError::InvalidField {
                collection: self.name.clone(),
                field: field.name.clone(),
                expected,
                found: describe_value(value),
            })
        }
    }

    fn missing(&self, field: &FieldSpec) -> SchemaError {
        SchemaError::MissingField {
            collection: self.name.clone(),
            field: field.name.clone(),
        }
    }
}

/// The set of collections medmesh knows: the built-in Hikma Health collections plus any
/// declared in schema files.
#[derive(Debug, Clone)]
pub struct Schema {
    collections: BTreeMap<String, CollectionSpec>,
}

impl Schema {
    /// The built-in Hikma Health collections.
    pub fn hikma() -> Schema {
        let collections = HIKMA_COLLECTIONS
            .iter()
            .map(|(name, columns)| {
                let own = columns
                    .iter()
                    .map(|&(field, ty, required, index)| FieldSpec::new(field, ty, required, index))
                    .collect();
                (
                    (*name).to_owned(),
                    CollectionSpec::with_common_fields(name, own, true),
                )
            })
            .collect::<BTreeMap<_, _>>();
        let mut collections = collections;
        collections.insert(
            SCHEMA_COLLECTION.to_owned(),
            CollectionSpec::with_common_fields(SCHEMA_COLLECTION, Vec::new(), true),
        );
        let ledger = crate::pharmacy::STOCK_LEDGERS;
        collections.insert(
            ledger.to_owned(),
            CollectionSpec::with_common_fields(
                ledger,
                vec![
                    FieldSpec::new("stock_item_id", FieldType::Id, true, Some(IndexKind::Exact)),
                    FieldSpec::new("clinic_id", FieldType::Id, false, Some(IndexKind::Exact)),
                    FieldSpec::new("drug_id", FieldType::Id, false, None),
                    FieldSpec::new("device", FieldType::String, false, None),
                    FieldSpec::new("index", FieldType::Int, false, None),
                    FieldSpec::new("delta", FieldType::Int, false, None),
                    FieldSpec::new("movements", FieldType::Int, false, None),
                ],
                true,
            ),
        );
        collections.insert(
            GATEWAYS_COLLECTION.to_owned(),
            CollectionSpec::with_common_fields(
                GATEWAYS_COLLECTION,
                vec![
                    FieldSpec::new("peer_id", FieldType::String, true, None),
                    FieldSpec::new("cloud", FieldType::String, false, None),
                    FieldSpec::new("seen_at", FieldType::Timestamp, false, None),
                ],
                true,
            ),
        );
        collections.insert(
            DEVICES_COLLECTION.to_owned(),
            CollectionSpec::with_common_fields(
                DEVICES_COLLECTION,
                vec![
                    FieldSpec::new("peer_id", FieldType::String, true, None),
                    FieldSpec::new("name", FieldType::String, false, None),
                    FieldSpec::new("kind", FieldType::String, false, None),
                    FieldSpec::new("certificate", FieldType::String, true, None),
                ],
                true,
            ),
        );
        collections.insert(
            REVOCATIONS_COLLECTION.to_owned(),
            CollectionSpec::with_common_fields(
                REVOCATIONS_COLLECTION,
                vec![
                    FieldSpec::new("peer_id", FieldType::String, true, None),
                    FieldSpec::new("reason", FieldType::String, false, None),
                    FieldSpec::new("revocation", FieldType::String, true, None),
                ],
                true,
            ),
        );
        collections.insert(
            ACCESS_LOG_COLLECTION.to_owned(),
            CollectionSpec::with_common_fields(
                ACCESS_LOG_COLLECTION,
                vec![
                    FieldSpec::new("user", FieldType::String, true, None),
                    FieldSpec::new("user_id", FieldType::Id, false, Some(IndexKind::Exact)),
                    FieldSpec::new("device", FieldType::String, true, None),
                    FieldSpec::new("at", FieldType::Timestamp, true, None),
                    FieldSpec::new("action", FieldType::String, true, None),
                    FieldSpec::new("collection", FieldType::String, true, None),
                    FieldSpec::new("record_id", FieldType::Id, false, Some(IndexKind::Exact)),
                    FieldSpec::new("patient_id", FieldType::Id, false, Some(IndexKind::Exact)),
                    FieldSpec::new("count", FieldType::Int, false, None),
                ],
                true,
            ),
        );
        Schema { collections }
    }

    /// Add the extra collections declared in a schema file's text (JSON). `source` names
    /// the file in errors. Nothing is added unless the whole file is valid.
    pub fn extend_from_json(&mut self, text: &str, source: &str) -> Result<(), SchemaFileError> {
        let declarations = self.declarations_of_file(text, source)?;
        for declaration in &declarations {
            if self.collections.contains_key(&declaration.name) {
                return Err(SchemaFileError::Invalid {
                    source_name: source.to_owned(),
                    message: format!(
                        "collection `{}` is already defined by an earlier schema file; \
                         declare it only once",
                        declaration.name
                    ),
                });
            }
        }
        for declaration in declarations {
            self.collections
                .insert(declaration.name.clone(), declaration.spec().clone());
        }
        Ok(())
    }

    /// Reads and checks a schema file's declarations (none is taken unless all are
    /// valid): built-in collections cannot be redefined, a collection is declared once.
    pub fn declarations_of_file(
        &self,
        text: &str,
        source: &str,
    ) -> Result<Vec<Declaration>, SchemaFileError> {
        let file: SchemaFile = serde_json::from_str(text).map_err(|err| {
            let (line, column) = (err.line(), err.column());
            let message = err.to_string();
            let suffix = format!(" at line {line} column {column}");
            SchemaFileError::Json {
                source_name: source.to_owned(),
                line,
                column,
                message: message.strip_suffix(&suffix).unwrap_or(&message).to_owned(),
            }
        })?;
        let invalid = |message: String| SchemaFileError::Invalid {
            source_name: source.to_owned(),
            message,
        };
        let mut out: Vec<Declaration> = Vec::new();
        for decl in file.collections {
            let declaration = Declaration::from_decl(decl).map_err(invalid)?;
            if self
                .collections
                .get(&declaration.name)
                .is_some_and(|existing| existing.builtin)
            {
                return Err(invalid(format!(
                    "collection `{}` is a built-in Hikma Health collection and cannot be \
                     redefined; choose another name",
                    declaration.name
                )));
            }
            if out.iter().any(|d| d.name == declaration.name) {
                return Err(invalid(format!(
                    "collection `{}` is declared twice; merge the two declarations",
                    declaration.name
                )));
            }
            out.push(declaration);
        }
        Ok(out)
    }

    /// This schema with the given declarations added (a declaration of a built-in
    /// collection is skipped); answers the schema and what was skipped, in words.
    pub fn with_declarations(&self, declarations: &[Declaration]) -> (Schema, Vec<String>) {
        let mut schema = self.clone();
        let mut skipped = Vec::new();
        for declaration in declarations {
            match schema.collections.get(&declaration.name) {
                Some(existing) if existing.builtin => skipped.push(format!(
                    "the mesh's schema declares `{}`, a built-in collection; the declaration is ignored",
                    declaration.name
                )),
                _ => {
                    schema
                        .collections
                        .insert(declaration.name.clone(), declaration.spec().clone());
                }
            }
        }
        (schema, skipped)
    }

    /// The collection called `name`, if there is one.
    pub fn collection(&self, name: &str) -> Option<&CollectionSpec> {
        self.collections.get(name)
    }

    /// All collections that hold records, ordered by name (medmesh's internal ones,
    /// such as [`SCHEMA_COLLECTION`], are left out).
    pub fn collections(&self) -> impl Iterator<Item = &CollectionSpec> {
        self.collections
            .values()
            .filter(|c| !c.name.starts_with('_'))
    }
}

/// Normalize a value for an index key. Prefix indexes lowercase strings and collapse
/// their whitespace (trimmed); Exact keeps strings as they are; numbers and bools use
/// their JSON text. `null`, objects, arrays and empty strings give `None` (not indexed).
pub fn index_value(value: &Value, kind: IndexKind) -> Option<String> {
    let key = match value {
        Value::String(s) => match kind {
            IndexKind::Exact => s.clone(),
            IndexKind::Prefix => s
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase(),
        },
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => return None,
    };
    (!key.is_empty()).then_some(key)
}

/// Fields kept as Automerge counters rather than plain numbers: quantities that devices
/// change concurrently and that must add up after a merge (a write of an absolute value
/// becomes an increment by the difference).
pub fn counter_fields(collection: &str) -> &'static [&'static str] {
    match collection {
        "clinic_inventory" => &["quantity_available"],
        "prescription_items" => &["quantity_dispensed", "refills_used"],
        crate::pharmacy::STOCK_LEDGERS => &["delta", "movements"],
        _ => &[],
    }
}

/// Is `name` a valid collection name: `^[a-z][a-z0-9_]{0,62}$`. Field names in schema
/// files follow the same rule.
pub fn is_valid_collection_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A record that does not fit its collection's schema.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SchemaError {
    /// A field has a value of the wrong type.
    #[error("field `{field}` of {collection} must be {expected}, but got {found}")]
    InvalidField {
        /// The collection the record belongs to.
        collection: String,
        /// The field's name.
        field: String,
        /// What the value should have been.
        expected: &'static str,
        /// A short description of the value found.
        found: String,
    },
    /// A required field is absent or null.
    #[error("field `{field}` is required in {collection}")]
    MissingField {
        /// The collection the record belongs to.
        collection: String,
        /// The field's name.
        field: String,
    },
}

impl SchemaError {
    /// The name of the field at fault.
    pub fn field(&self) -> &str {
        match self {
            SchemaError::InvalidField { field, .. } | SchemaError::MissingField { field, .. } => {
                field
            }
        }
    }
}

/// A schema file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaFileError {
    /// The file is not valid JSON, or does not have the schema file's shape.
    #[error("schema file {source_name}, line {line}, column {column}: {message}")]
    Json {
        /// The file's name.
        source_name: String,
        /// Line of the error (1-based).
        line: usize,
        /// Column of the error (1-based).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The file is well-formed but declares something medmesh cannot accept.
    #[error("schema file {source_name}: {message}")]
    Invalid {
        /// The file's name.
        source_name: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The top level of a schema file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    collections: Vec<CollectionDecl>,
}

/// One collection in a schema file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectionDecl {
    name: String,
    /// The declaration's version: a mesh keeps, per collection, the highest version any
    /// of its devices declared.
    #[serde(default = "first_version")]
    version: u64,
    #[serde(default)]
    fields: Vec<FieldDecl>,
}

fn first_version() -> u64 {
    1
}

/// One field in a schema file. `type` and `index` are read as text so that a mistake
/// gets a message naming the collection and field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldDecl {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index: Option<String>,
}

const NAME_RULE: &str = "use 1 to 63 lowercase letters, digits or `_`, starting with a letter";

impl CollectionDecl {
    /// Check the declaration and turn it into a collection; errors are messages.
    fn into_spec(self) -> Result<CollectionSpec, String> {
        let collection = self.name;
        if self.version == 0 {
            return Err(format!(
                "collection `{collection}`: version must be 1 or more"
            ));
        }
        if !is_valid_collection_name(&collection) {
            return Err(format!(
                "collection name `{collection}` is not valid: {NAME_RULE} (e.g. `lab_reports`)"
            ));
        }
        let mut own: Vec<FieldSpec> = Vec::with_capacity(self.fields.len());
        for decl in self.fields {
            let name = decl.name;
            let at = format!("collection `{collection}`, field `{name}`");
            if COMMON_FIELDS.contains(&name.as_str()) {
                return Err(format!(
                    "{at}: `{name}` is a common field every collection has automatically \
                     ({}); remove it from the file",
                    COMMON_FIELDS.join(", ")
                ));
            }
            if !is_valid_collection_name(&name) {
                return Err(format!("{at}: the name is not valid: {NAME_RULE}"));
            }
            if own.iter().any(|field| field.name == name) {
                return Err(format!("{at}: declared twice; remove one of them"));
            }
            let ty = FieldType::from_name(&decl.ty).ok_or_else(|| {
                let known: Vec<&str> = FieldType::ALL.iter().map(|ty| ty.as_str()).collect();
                format!(
                    "{at}: unknown type `{}`; use one of: {}",
                    decl.ty,
                    known.join(", ")
                )
            })?;
            let index = match decl.index.as_deref() {
                None => None,
                Some(text) => Some(IndexKind::from_name(text).ok_or_else(|| {
                    format!(
                        "{at}: unknown index `{text}`; use `exact` or `prefix`, or leave `index` out"
                    )
                })?),
            };
            match (index, ty) {
                (Some(_), FieldType::Json | FieldType::StringList) => {
                    return Err(format!(
                        "{at}: a field of type `{}` cannot be indexed; remove `index`",
                        ty.as_str()
                    ));
                }
                (Some(IndexKind::Prefix), ty) if ty != FieldType::String => {
                    return Err(format!(
                        "{at}: a `prefix` index needs a field of type `string`, not `{}`; \
                         use `exact` instead",
                        ty.as_str()
                    ));
                }
                _ => {}
            }
            own.push(FieldSpec::new(&name, ty, decl.required, index));
        }
        Ok(CollectionSpec::with_common_fields(&collection, own, false))
    }
}

/// A short description of a value for error messages, e.g. `a string "abc"`.
fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.is_empty() => "an empty string".to_owned(),
        Value::String(s) => {
            let mut shown: String = s.chars().take(MAX_SHOWN_CHARS).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("a string {shown:?}")
        }
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// A UUID in its canonical hyphenated form (either case).
fn is_uuid_text(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// `YYYY-MM-DD`, a real calendar date.
fn is_date_text(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// An RFC 3339 date-time, or an ISO 8601 one without an offset (taken as UTC).
fn is_timestamp_text(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok()
        || ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .any(|format| chrono::NaiveDateTime::parse_from_str(s, format).is_ok())
}

/// A decimal number as text: optional sign, digits with an optional fraction, optional
/// exponent (`-12`, `0.5`, `.5`, `1e3`). No spaces, `NaN` or infinities.
fn is_decimal_text(s: &str) -> bool {
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mantissa_ok =
        digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

/// The mesh's gateways to the Hikma cloud: one record per gateway node, refreshed
/// while it runs, so that one of them (the lowest peer id) brings the cloud's stock
/// movements into the mesh.
pub const GATEWAYS_COLLECTION: &str = "_gateways";

/// The mesh's devices: one record per device, holding its certificate (signed by the
/// mesh's owner key, so a record any member altered does not verify).
pub const DEVICES_COLLECTION: &str = "_devices";

/// Revocations of devices, each signed by the mesh's owner key.
pub const REVOCATIONS_COLLECTION: &str = "_revocations";
/// Who read which patient's record, when, on which device: append-only, replicated so
/// that every node can answer who looked at whom.
pub const ACCESS_LOG_COLLECTION: &str = "_access_log";

mod hikma;
mod mesh;
use hikma::HIKMA_COLLECTIONS;
pub use mesh::{
    Declaration, SCHEMA_COLLECTION, declarations_in_record, record_fields, schema_doc_id,
};

#[cfg(test)]
mod tests;
