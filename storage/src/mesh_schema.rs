//! Declaring collections into the mesh's schema document.

use medmesh_protocol::schema::{
    Declaration, SCHEMA_COLLECTION, declarations_in_record, record_fields, schema_doc_id,
};
use medmesh_protocol::{ChangeAuthor, DocId};
use serde_json::Value;

use crate::error::Result;
use crate::store::Store;
use crate::write::{WriteBatch, WriteKind, WriteOp};

impl Store {
    /// Writes declarations into the mesh's schema document, from where they reach every
    /// node. A declaration replaces the mesh's only when its version is higher; answers,
    /// in words, each one that was not written and why.
    pub async fn declare_schema(
        &self,
        declarations: &[Declaration],
        author: ChangeAuthor,
    ) -> Result<Vec<String>> {
        let (batch, notes) = self.schema_batch(declarations, author)?;
        if let Some(batch) = batch {
            for result in self.write(batch).await? {
                result?;
            }
        }
        Ok(notes)
    }

    /// [`Store::declare_schema`] for threads outside an async runtime.
    pub fn declare_schema_blocking(
        &self,
        declarations: &[Declaration],
        author: ChangeAuthor,
    ) -> Result<Vec<String>> {
        let (batch, notes) = self.schema_batch(declarations, author)?;
        if let Some(batch) = batch {
            for result in self.write_blocking(batch)? {
                result?;
            }
        }
        Ok(notes)
    }

    fn schema_batch(
        &self,
        declarations: &[Declaration],
        author: ChangeAuthor,
    ) -> Result<(Option<WriteBatch>, Vec<String>)> {
        let id = schema_doc_id();
        let current = match self.get(SCHEMA_COLLECTION, &id) {
            Ok(view) => declarations_in_record(&view.record).0,
            Err(crate::StoreError::NotFound { .. }) => Vec::new(),
            Err(err) => return Err(err),
        };
        let mut notes = Vec::new();
        let mut write = Vec::new();
        for declaration in declarations {
            match current.iter().find(|d| d.name == declaration.name) {
                Some(mesh) if mesh.version > declaration.version => notes.push(format!(
                    "`{}` version {} is older than the mesh's version {}; the mesh's is kept",
                    declaration.name, declaration.version, mesh.version
                )),
                Some(mesh) if mesh.version == declaration.version && mesh.text != declaration.text => {
                    notes.push(format!(
                        "`{}` version {} differs from the mesh's declaration of the same version; the mesh's is kept (raise \"version\" in the file to replace it)",
                        declaration.name, declaration.version
                    ))
                }
                Some(mesh) if mesh.version == declaration.version => {}
                _ => write.push(declaration.clone()),
            }
        }
        if write.is_empty() {
            return Ok((None, notes));
        }
        let mut base = serde_json::Map::new();
        base.insert("id".into(), Value::String(id.to_string()));
        let ops = vec![
            WriteOp::new(
                SCHEMA_COLLECTION,
                Some(id),
                WriteKind::Ensure {
                    fields: base,
                    counters: Vec::new(),
                },
                author.clone(),
            ),
            WriteOp::new(
                SCHEMA_COLLECTION,
                Some(id),
                WriteKind::Patch(record_fields(&write)),
                author,
            ),
        ];
        Ok((Some(WriteBatch { ops, atomic: true }), notes))
    }

    /// The mesh's schema document's id.
    pub fn schema_doc_id(&self) -> DocId {
        schema_doc_id()
    }
}
