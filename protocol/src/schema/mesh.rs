//! The schema as mesh state.
//!
//! Extra collections declared with `--schema` on one device must reach every device, or
//! the others could not show (or index) their records. So the declarations live in one
//! replicated document of the internal collection [`SCHEMA_COLLECTION`], with the
//! deterministic id [`schema_doc_id`]: each declared collection is one root field,
//! `collection:<name>`, holding the declaration as JSON text with its version. Devices
//! that declare different collections while apart merge into one schema; for one
//! collection the highest version wins (a device writes its declaration only over a
//! lower version), and two different declarations of the same version resolve to the
//! same one everywhere, as any concurrent edit of one field does.

use serde_json::Value;

use super::{CollectionDecl, CollectionSpec};
use crate::DocId;
use crate::record::Fields;

/// The internal collection that holds the mesh's schema document. Names that start with
/// `_` cannot be declared in schema files, so it never collides with a deployment's.
pub const SCHEMA_COLLECTION: &str = "_schema";
/// The prefix of each declaration's field in the schema document.
const FIELD_PREFIX: &str = "collection:";

/// The id of the mesh's schema document (the same on every device).
pub fn schema_doc_id() -> DocId {
    DocId::derived("schema", &["mesh"])
}

/// One declared collection: its name, version, the declaration as JSON text (as stored
/// in the schema document), and the collection it defines.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    /// The collection's name.
    pub name: String,
    /// The declaration's version.
    pub version: u64,
    /// The declaration as JSON text.
    pub text: String,
    spec: CollectionSpec,
}

impl Declaration {
    pub(super) fn from_decl(decl: CollectionDecl) -> Result<Self, String> {
        let text = serde_json::to_string(&decl)
            .map_err(|e| format!("collection `{}` cannot be written: {e}", decl.name))?;
        let name = decl.name.clone();
        let version = decl.version;
        let spec = decl.into_spec()?;
        Ok(Self {
            name,
            version,
            text,
            spec,
        })
    }

    /// A declaration from its JSON text, as stored in the schema document.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let decl: CollectionDecl = serde_json::from_str(text)
            .map_err(|e| format!("a declaration in the mesh's schema is unreadable: {e}"))?;
        Self::from_decl(decl)
    }

    /// The collection it defines.
    pub fn spec(&self) -> &CollectionSpec {
        &self.spec
    }

    /// The schema document's field that holds it.
    pub fn field_name(&self) -> String {
        format!("{FIELD_PREFIX}{}", self.name)
    }
}

/// The schema document's fields for these declarations (to write as a patch).
pub fn record_fields(declarations: &[Declaration]) -> Fields {
    declarations
        .iter()
        .map(|d| (d.field_name(), Value::String(d.text.clone())))
        .collect()
}

/// The declarations held by the schema document's record, and what could not be read.
pub fn declarations_in_record(record: &Fields) -> (Vec<Declaration>, Vec<String>) {
    let mut declarations = Vec::new();
    let mut problems = Vec::new();
    for (field, value) in record {
        let Some(name) = field.strip_prefix(FIELD_PREFIX) else {
            continue;
        };
        let parsed = match value {
            Value::String(text) => Declaration::from_text(text),
            _ => Err(format!("the declaration of `{name}` is not text")),
        };
        match parsed {
            Ok(declaration) if declaration.name == name => declarations.push(declaration),
            Ok(declaration) => problems.push(format!(
                "the mesh's schema field `{field}` declares `{}`; it is ignored",
                declaration.name
            )),
            Err(problem) => problems.push(problem),
        }
    }
    (declarations, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Schema;

    const LAB: &str = r#"{"collections": [{"name": "lab_reports", "version": 2, "fields": [
        {"name": "patient_id", "type": "id", "required": true, "index": "exact"},
        {"name": "test_name", "type": "string", "index": "prefix"}]}]}"#;

    #[test]
    fn declarations_round_trip_through_the_schema_document() {
        let base = Schema::hikma();
        let declarations = base.declarations_of_file(LAB, "lab.json").expect("valid");
        assert_eq!(declarations[0].version, 2);
        let record = record_fields(&declarations);
        assert!(record.contains_key("collection:lab_reports"));
        let (back, problems) = declarations_in_record(&record);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(back, declarations);
        let (schema, skipped) = base.with_declarations(&back);
        assert!(skipped.is_empty());
        let spec = schema.collection("lab_reports").expect("declared");
        assert!(spec.field("test_name").is_some());
        assert!(!spec.builtin);
    }

    #[test]
    fn a_schema_document_cannot_redefine_a_built_in_collection() {
        let mut record = Fields::new();
        record.insert(
            "collection:patients".into(),
            Value::String(r#"{"name": "patients", "fields": []}"#.into()),
        );
        record.insert("collection:broken".into(), Value::from(3));
        let (declarations, problems) = declarations_in_record(&record);
        assert_eq!(problems.len(), 1);
        let (schema, skipped) = Schema::hikma().with_declarations(&declarations);
        assert_eq!(skipped.len(), 1);
        assert!(schema.collection("patients").expect("builtin").builtin);
    }

    #[test]
    fn the_schema_document_id_is_fixed() {
        assert_eq!(schema_doc_id(), schema_doc_id());
        assert!(Schema::hikma().collection(SCHEMA_COLLECTION).is_some());
    }
}
