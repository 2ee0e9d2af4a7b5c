//! Which clinics a record belongs to, and which records a device holds.
//!
//! A device's **scope** is the list of clinic ids in its certificate; an empty list means
//! every clinic. A device holds, receives and relays only the records in its scope.
//!
//! The rules, one per kind of collection (the only place they are written):
//!
//! | collection | belongs to |
//! |---|---|
//! | `patients` | its `primary_clinic_id`, and every clinic where it has a visit or an appointment |
//! | `visits`, `appointments` | their patient (and they bring their `clinic_id` to the patient's clinics) |
//! | any other record with a `patient_id` (events, vitals, problems, prescriptions and their items, dispensing records, additional attributes, the access log) | its patient |
//! | a record with a `clinic_id` and no patient (`clinic_inventory`, `inventory_transactions`, `_stock_ledgers`, a dispense to no patient) | that clinic |
//! | reference data: `clinics`, `users`, `user_clinic_permissions`, `clinic_departments`, `registration_forms`, `event_forms`, `drug_catalogue`, `app_config`, the mesh's `_` collections (schema, devices, revocations, gateways) | every device |
//! | anything else (no patient, no clinic) | every device |
//!
//! A record whose patient is not known yet to a device follows that patient when it
//! arrives. Collections a deployment declares follow the same rules by their fields.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::DocId;
use crate::record::Fields;

/// Collections that every device holds even though they name a clinic.
pub const REFERENCE_COLLECTIONS: &[&str] = &[
    "clinics",
    "users",
    "user_clinic_permissions",
    "clinic_departments",
    "registration_forms",
    "event_forms",
    "drug_catalogue",
    "app_config",
];

/// The collection of patients.
pub const PATIENTS: &str = "patients";

/// Collections whose records add their `clinic_id` to their patient's clinics.
pub const PATIENT_CLINIC_SOURCES: &[&str] = &["visits", "appointments"];

/// What decides whether a record is in a scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Belongs {
    /// Every device holds it.
    All,
    /// The devices of this clinic hold it.
    Clinic(String),
    /// It follows this patient.
    Patient(DocId),
}

/// Where a record belongs, and the clinic it brings to its patient's clinics (a patient's
/// primary clinic, a visit's or an appointment's clinic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Where it belongs.
    pub belongs: Belongs,
    /// The clinic it adds to its patient's clinics.
    pub brings: Option<String>,
}

impl Placement {
    /// Where a record of `collection` with this content belongs.
    pub fn of(collection: &str, id: &DocId, record: &Fields) -> Self {
        let text = |field: &str| {
            record
                .get(field)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        if collection == PATIENTS {
            return Self {
                belongs: Belongs::Patient(*id),
                brings: text("primary_clinic_id"),
            };
        }
        // The mesh's own collections go everywhere, except the stock ledgers (by clinic)
        // and the access log (it names the patient whose record was read).
        let internal = collection.starts_with('_')
            && collection != crate::pharmacy::STOCK_LEDGERS
            && collection != crate::schema::ACCESS_LOG_COLLECTION;
        if internal || REFERENCE_COLLECTIONS.contains(&collection) {
            return Self::everywhere();
        }
        let patient = text("patient_id").and_then(|p| p.parse::<DocId>().ok());
        let clinic = text("clinic_id");
        match (patient, clinic) {
            (Some(patient), clinic) => Self {
                belongs: Belongs::Patient(patient),
                brings: clinic.filter(|_| PATIENT_CLINIC_SOURCES.contains(&collection)),
            },
            (None, Some(clinic)) => Self {
                belongs: Belongs::Clinic(clinic),
                brings: None,
            },
            (None, None) => Self::everywhere(),
        }
    }

    /// A record every device holds.
    pub fn everywhere() -> Self {
        Self {
            belongs: Belongs::All,
            brings: None,
        }
    }
}

/// The clinics a device serves: `None` for all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    clinics: Option<BTreeSet<String>>,
}

impl Scope {
    /// Every clinic.
    pub fn all() -> Self {
        Self { clinics: None }
    }

    /// The scope of a certificate's clinic list (empty: every clinic).
    pub fn of_clinics<S: AsRef<str>>(clinics: &[S]) -> Self {
        if clinics.is_empty() {
            return Self::all();
        }
        Self {
            clinics: Some(clinics.iter().map(|c| c.as_ref().to_owned()).collect()),
        }
    }

    /// Every clinic?
    pub fn is_all(&self) -> bool {
        self.clinics.is_none()
    }

    /// The clinics, or `None` for all.
    pub fn clinics(&self) -> Option<&BTreeSet<String>> {
        self.clinics.as_ref()
    }

    /// Whether the scope serves `clinic`.
    pub fn serves(&self, clinic: &str) -> bool {
        self.clinics.as_ref().is_none_or(|c| c.contains(clinic))
    }

    /// Whether the scope serves any of `clinics`.
    pub fn serves_any<'a>(&self, mut clinics: impl Iterator<Item = &'a str>) -> bool {
        match &self.clinics {
            None => true,
            Some(mine) => clinics.any(|c| mine.contains(c)),
        }
    }

    /// What both scopes serve (what two devices compare).
    pub fn intersect(&self, other: &Scope) -> Scope {
        match (&self.clinics, &other.clinics) {
            (None, _) => other.clone(),
            (_, None) => self.clone(),
            (Some(a), Some(b)) => Scope {
                clinics: Some(a.intersection(b).cloned().collect()),
            },
        }
    }

    /// Whether everything this scope serves, `other` serves too.
    pub fn within(&self, other: &Scope) -> bool {
        match (&self.clinics, &other.clinics) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => a.is_subset(b),
        }
    }

    /// For people: "all clinics" or the list.
    pub fn describe(&self) -> String {
        match &self.clinics {
            None => "all clinics".to_owned(),
            Some(c) if c.is_empty() => "no clinic".to_owned(),
            Some(c) => c.iter().cloned().collect::<Vec<_>>().join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Fields {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn each_collection_belongs_where_the_rules_say() {
        let id = DocId::new_v7();
        let patient = DocId::new_v7();
        let p = patient.to_string();
        let of = |c: &str, r: Value| Placement::of(c, &id, &fields(r));
        assert_eq!(
            of("patients", json!({"primary_clinic_id": "c1"})),
            Placement {
                belongs: Belongs::Patient(id),
                brings: Some("c1".into())
            }
        );
        assert_eq!(
            of("visits", json!({"patient_id": p, "clinic_id": "c2"})),
            Placement {
                belongs: Belongs::Patient(patient),
                brings: Some("c2".into())
            }
        );
        assert_eq!(
            of("appointments", json!({"patient_id": p, "clinic_id": "c3"})).brings,
            Some("c3".into())
        );
        for collection in [
            "events",
            "patient_vitals",
            "prescription_items",
            "_access_log",
        ] {
            assert_eq!(
                of(collection, json!({"patient_id": p, "clinic_id": "c9"})),
                Placement {
                    belongs: Belongs::Patient(patient),
                    brings: None
                },
                "{collection}"
            );
        }
        for collection in [
            "clinic_inventory",
            "inventory_transactions",
            "_stock_ledgers",
        ] {
            assert_eq!(
                of(collection, json!({"clinic_id": "c1"})).belongs,
                Belongs::Clinic("c1".into()),
                "{collection}"
            );
        }
        assert_eq!(
            of(
                "dispensing_records",
                json!({"clinic_id": "c1", "patient_id": null})
            )
            .belongs,
            Belongs::Clinic("c1".into())
        );
        for collection in ["users", "clinics", "drug_catalogue", "_devices", "_schema"] {
            assert_eq!(
                of(collection, json!({"clinic_id": "c1", "patient_id": p})).belongs,
                Belongs::All,
                "{collection}"
            );
        }
        assert_eq!(of("declared_things", json!({"x": 1})).belongs, Belongs::All);
        // A patient id that is not an id cannot be followed: the clinic decides.
        assert_eq!(
            of("events", json!({"patient_id": "??", "clinic_id": "c4"})).belongs,
            Belongs::Clinic("c4".into())
        );
    }

    #[test]
    fn scopes_compare_as_sets_of_clinics() {
        let all = Scope::all();
        let one = Scope::of_clinics(&["c1"]);
        let two = Scope::of_clinics(&["c1", "c2"]);
        assert!(Scope::of_clinics::<&str>(&[]).is_all());
        assert!(all.serves("anything"));
        assert!(one.serves("c1") && !one.serves("c2"));
        assert_eq!(all.intersect(&one), one);
        assert_eq!(two.intersect(&one), one);
        assert!(one.within(&two) && one.within(&all) && !all.within(&two) && !two.within(&one));
        assert!(two.serves_any(["x", "c2"].into_iter()));
        assert_eq!(two.describe(), "c1, c2");
    }
}
