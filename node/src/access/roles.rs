//! What each role may do: the permission matrix, refined per clinic by the
//! `user_clinic_permissions` flags the way the Hikma cloud defines them.
//!
//! A request needs one [`Permission`]. The role decides whether it may ever have it
//! ([`Role::may`]); where the permission has a clinic flag ([`Permission::flag`]), the
//! user's `user_clinic_permissions` row for the record's clinic must also grant it (or
//! make the user that clinic's admin). A user with no rows at all gets the defaults the
//! Hikma cloud gives their role when it creates them ([`Role::default_flag`]).
//! `super_admin` and the node's own command line (its API token) may do everything.
//!
//! | permission            | registrar | provider | pharmacist | admin | super_admin | clinic flag |
//! |-----------------------|-----------|----------|------------|-------|-------------|-------------|
//! | `read_patients`       | yes       | yes      | yes        | yes   | yes         | –           |
//! | `register_patients`   | yes       | yes      | –          | yes   | yes         | `can_register_patients` |
//! | `delete_patients`     | –         | flag     | –          | yes   | yes         | `can_delete_patient_records` |
//! | `read_appointments`   | yes       | yes      | –          | yes   | yes         | –           |
//! | `book_appointments`   | yes       | yes      | –          | yes   | yes         | –           |
//! | `read_clinical`       | –         | yes      | –          | yes   | yes         | `can_view_history` |
//! | `write_clinical`      | –         | yes      | –          | yes   | yes         | `can_edit_records` |
//! | `delete_clinical`     | –         | flag     | –          | yes   | yes         | `can_delete_records` |
//! | `read_prescriptions`  | –         | yes      | yes        | yes   | yes         | –           |
//! | `prescribe`           | –         | yes      | –          | yes   | yes         | `can_prescribe_medications` |
//! | `dispense`            | –         | flag     | yes        | yes   | yes         | `can_dispense_medications` |
//! | `read_stock`          | –         | yes      | yes        | yes   | yes         | –           |
//! | `manage_stock`        | –         | –        | yes        | yes   | yes         | –           |
//! | `read_reference`      | yes       | yes      | yes        | yes   | yes         | –           |
//! | `manage_reference`    | –         | –        | –          | yes   | yes         | `is_clinic_admin` |
//! | `manage_users`        | –         | –        | –          | yes   | yes         | `is_clinic_admin` |
//! | `manage_devices`      | –         | –        | –          | yes   | yes         | –           |
//! | `read_audit`          | –         | –        | –          | yes   | yes         | –           |
//! | `read_status`         | yes       | yes      | yes        | yes   | yes         | –           |
//!
//! "flag": the role has it only where its clinic flag grants it (a provider's defaults do
//! not). `pharmacist` is medmesh's own role (the Hikma cloud has none); its flag defaults
//! grant dispensing and nothing clinical.

use std::collections::HashMap;
use std::fmt;

use medmesh_protocol::record::Fields;
use serde_json::Value;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Registers patients and books appointments; reads no clinical record.
    Registrar,
    /// Sees patients, records visits and events, prescribes.
    Provider,
    /// Dispenses and keeps the stock.
    Pharmacist,
    /// Manages a clinic's users, devices and reference data, and everything above.
    Admin,
    /// Everything, in every clinic.
    SuperAdmin,
    /// The node's own command line (its API token): everything, on this device.
    Device,
}

impl Role {
    /// The roles a user may be given.
    pub const ASSIGNABLE: [&str; 5] = [
        "registrar",
        "provider",
        "pharmacist",
        "admin",
        "super_admin",
    ];

    /// The role named `name` (as the `users.role` field spells it).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "registrar" => Some(Self::Registrar),
            "provider" => Some(Self::Provider),
            "pharmacist" => Some(Self::Pharmacist),
            "admin" => Some(Self::Admin),
            "super_admin" => Some(Self::SuperAdmin),
            _ => None,
        }
    }

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Registrar => "registrar",
            Self::Provider => "provider",
            Self::Pharmacist => "pharmacist",
            Self::Admin => "admin",
            Self::SuperAdmin => "super_admin",
            Self::Device => "this device's command line",
        }
    }

    /// Whether the role may ever have `permission` (clinic flags may still refuse it).
    pub fn may(self, permission: Permission) -> bool {
        use Permission::*;
        use Role::*;
        match self {
            SuperAdmin | Device | Admin => true,
            Registrar => matches!(
                permission,
                ReadPatients
                    | RegisterPatients
                    | ReadAppointments
                    | BookAppointments
                    | ReadReference
                    | ReadStatus
            ),
            Provider => !matches!(
                permission,
                ManageStock | ManageReference | ManageUsers | ManageDevices | ReadAudit
            ),
            Pharmacist => matches!(
                permission,
                ReadPatients
                    | ReadPrescriptions
                    | Dispense
                    | ReadStock
                    | ManageStock
                    | ReadReference
                    | ReadStatus
            ),
        }
    }

    /// Whether a user of this role with no `user_clinic_permissions` row has `flag`: the
    /// defaults the Hikma cloud writes when it creates a user of the role.
    pub fn default_flag(self, flag: Flag) -> bool {
        match self {
            Self::Admin | Self::SuperAdmin | Self::Device => true,
            Self::Provider => matches!(
                flag,
                Flag::RegisterPatients
                    | Flag::ViewHistory
                    | Flag::EditRecords
                    | Flag::PrescribeMedications
            ),
            Self::Registrar => flag == Flag::RegisterPatients,
            Self::Pharmacist => flag == Flag::DispenseMedications,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read patients' demographic records.
    ReadPatients,
    /// Register or edit patients.
    RegisterPatients,
    /// Delete patients.
    DeletePatients,
    /// Read appointments.
    ReadAppointments,
    /// Book or change appointments.
    BookAppointments,
    /// Read visits, events, vitals and problems.
    ReadClinical,
    /// Record visits, events, vitals and problems.
    WriteClinical,
    /// Delete visits, events, vitals and problems.
    DeleteClinical,
    /// Read prescriptions, their items and dispensing records.
    ReadPrescriptions,
    /// Write prescriptions and their items.
    Prescribe,
    /// Dispense (and write dispensing records).
    Dispense,
    /// Read stock and its alerts.
    ReadStock,
    /// Restock, count and adjust stock.
    ManageStock,
    /// Read clinics, forms, the drug catalogue and the app's configuration.
    ReadReference,
    /// Change clinics, forms, the drug catalogue and the app's configuration.
    ManageReference,
    /// Manage users and their clinic permissions.
    ManageUsers,
    /// Manage the mesh: peers, devices, invites, revocation, verification, the feed.
    ManageDevices,
    /// Read the access log and the mesh's own records.
    ReadAudit,
    /// Read this node's status.
    ReadStatus,
}

impl Permission {
    /// Every permission, in the matrix's order.
    pub const ALL: [Permission; 19] = [
        Permission::ReadPatients,
        Permission::RegisterPatients,
        Permission::DeletePatients,
        Permission::ReadAppointments,
        Permission::BookAppointments,
        Permission::ReadClinical,
        Permission::WriteClinical,
        Permission::DeleteClinical,
        Permission::ReadPrescriptions,
        Permission::Prescribe,
        Permission::Dispense,
        Permission::ReadStock,
        Permission::ManageStock,
        Permission::ReadReference,
        Permission::ManageReference,
        Permission::ManageUsers,
        Permission::ManageDevices,
        Permission::ReadAudit,
        Permission::ReadStatus,
    ];

    /// The permission's name, as 403 answers give it.
    pub fn name(self) -> &'static str {
        use Permission::*;
        match self {
            ReadPatients => "read_patients",
            RegisterPatients => "register_patients",
            DeletePatients => "delete_patients",
            ReadAppointments => "read_appointments",
            BookAppointments => "book_appointments",
            ReadClinical => "read_clinical",
            WriteClinical => "write_clinical",
            DeleteClinical => "delete_clinical",
            ReadPrescriptions => "read_prescriptions",
            Prescribe => "prescribe",
            Dispense => "dispense",
            ReadStock => "read_stock",
            ManageStock => "manage_stock",
            ReadReference => "read_reference",
            ManageReference => "manage_reference",
            ManageUsers => "manage_users",
            ManageDevices => "manage_devices",
            ReadAudit => "read_audit",
            ReadStatus => "read_status",
        }
    }

    /// The `user_clinic_permissions` flag that refines it per clinic, if any.
    pub fn flag(self) -> Option<Flag> {
        use Permission::*;
        match self {
            RegisterPatients => Some(Flag::RegisterPatients),
            DeletePatients => Some(Flag::DeletePatientRecords),
            ReadClinical => Some(Flag::ViewHistory),
            WriteClinical => Some(Flag::EditRecords),
            DeleteClinical => Some(Flag::DeleteRecords),
            Prescribe => Some(Flag::PrescribeMedications),
            Dispense => Some(Flag::DispenseMedications),
            ManageReference | ManageUsers => Some(Flag::ClinicAdmin),
            _ => None,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `user_clinic_permissions` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flag {
    /// `can_register_patients`
    RegisterPatients,
    /// `can_view_history`
    ViewHistory,
    /// `can_edit_records`
    EditRecords,
    /// `can_delete_records`
    DeleteRecords,
    /// `can_prescribe_medications`
    PrescribeMedications,
    /// `can_dispense_medications`
    DispenseMedications,
    /// `can_delete_patient_records`
    DeletePatientRecords,
    /// `is_clinic_admin` (grants every other flag at its clinic, as in the Hikma app)
    ClinicAdmin,
}

impl Flag {
    /// The column's name.
    pub fn column(self) -> &'static str {
        match self {
            Self::RegisterPatients => "can_register_patients",
            Self::ViewHistory => "can_view_history",
            Self::EditRecords => "can_edit_records",
            Self::DeleteRecords => "can_delete_records",
            Self::PrescribeMedications => "can_prescribe_medications",
            Self::DispenseMedications => "can_dispense_medications",
            Self::DeletePatientRecords => "can_delete_patient_records",
            Self::ClinicAdmin => "is_clinic_admin",
        }
    }
}

/// A user's `user_clinic_permissions` rows: clinic id → the row; and their own clinic
/// (`users.clinic_id`), where a user with no rows has their role's defaults.
#[derive(Debug, Clone, Default)]
pub struct ClinicFlags {
    rows: HashMap<String, Fields>,
    home: Option<String>,
}

impl ClinicFlags {
    /// The flags of these rows (deleted rows are left out by the caller).
    pub fn new(rows: impl IntoIterator<Item = Fields>) -> Self {
        let rows = rows
            .into_iter()
            .filter_map(|row| {
                let clinic = row.get("clinic_id")?.as_str()?.to_owned();
                Some((clinic, row))
            })
            .collect();
        Self { rows, home: None }
    }

    /// The same flags for a user whose own clinic is `home`: with no rows, their role's
    /// defaults hold there only (and on records that name no clinic).
    pub fn at_home(mut self, home: Option<String>) -> Self {
        self.home = home;
        self
    }

    fn row_grants(row: &Fields, flag: Flag) -> bool {
        let set = |column: &str| row.get(column).and_then(Value::as_bool).unwrap_or(false);
        set(flag.column()) || set(Flag::ClinicAdmin.column())
    }

    /// Whether `role` has `flag` at `clinic` (any clinic when `None`).
    pub fn grants(&self, role: Role, flag: Flag, clinic: Option<&str>) -> bool {
        if matches!(role, Role::SuperAdmin | Role::Device) {
            return true;
        }
        if self.rows.is_empty() {
            let here = match (&self.home, clinic) {
                (Some(home), Some(clinic)) => home == clinic,
                _ => true,
            };
            return here && role.default_flag(flag);
        }
        match clinic {
            Some(clinic) => self
                .rows
                .get(clinic)
                .is_some_and(|row| Self::row_grants(row, flag)),
            None => self.rows.values().any(|row| Self::row_grants(row, flag)),
        }
    }
}

/// The permission each kind of access to a collection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read one record, a list, history or conflicts.
    Read,
    /// Create, patch or replace.
    Write,
    /// Delete.
    Delete,
}

/// The permission `access` to `collection` needs.
pub fn needed(collection: &str, access: Access) -> Permission {
    use Permission::*;
    let (read, write, delete) = match collection {
        "patients" | "patient_additional_attributes" => {
            (ReadPatients, RegisterPatients, DeletePatients)
        }
        "appointments" => (ReadAppointments, BookAppointments, BookAppointments),
        "prescriptions" | "prescription_items" => (ReadPrescriptions, Prescribe, Prescribe),
        "dispensing_records" => (ReadPrescriptions, Dispense, Dispense),
        "clinic_inventory" | "inventory_transactions" => (ReadStock, ManageStock, ManageStock),
        "clinics" | "clinic_departments" | "drug_catalogue" | "event_forms"
        | "registration_forms" | "app_config" => (ReadReference, ManageReference, ManageReference),
        "users" | "user_clinic_permissions" => (ManageUsers, ManageUsers, ManageUsers),
        name if name.starts_with('_') => (ReadAudit, ManageDevices, ManageDevices),
        // Visits, events, vitals, problems, and the collections a deployment declares.
        _ => (ReadClinical, WriteClinical, DeleteClinical),
    };
    match access {
        Access::Read => read,
        Access::Write => write,
        Access::Delete => delete,
    }
}

/// Whether reading `collection` reads a patient's record (and goes in the access log).
pub fn is_patient_record(collection: &str) -> bool {
    matches!(
        collection,
        "patients"
            | "patient_additional_attributes"
            | "visits"
            | "events"
            | "patient_vitals"
            | "patient_problems"
            | "appointments"
            | "prescriptions"
            | "prescription_items"
            | "dispensing_records"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(clinic: &str, flags: &[&str]) -> Fields {
        let mut row = Fields::new();
        row.insert("clinic_id".into(), json!(clinic));
        for flag in flags {
            row.insert((*flag).into(), json!(true));
        }
        row
    }

    #[test]
    fn a_registrar_reads_no_clinical_record_and_a_pharmacist_no_visit() {
        for collection in ["visits", "events", "patient_vitals", "patient_problems"] {
            let permission = needed(collection, Access::Read);
            assert!(!Role::Registrar.may(permission), "{collection}");
            assert!(!Role::Pharmacist.may(permission), "{collection}");
            assert!(Role::Provider.may(permission), "{collection}");
        }
        assert!(!Role::Registrar.may(needed("prescriptions", Access::Read)));
        assert!(Role::Registrar.may(needed("patients", Access::Write)));
        assert!(Role::Registrar.may(needed("appointments", Access::Write)));
    }

    #[test]
    fn dispensing_needs_the_flag_except_for_pharmacists() {
        let none = ClinicFlags::default();
        assert!(none.grants(Role::Pharmacist, Flag::DispenseMedications, Some("c1")));
        assert!(!none.grants(Role::Provider, Flag::DispenseMedications, Some("c1")));
        let flagged = ClinicFlags::new([row("c1", &["can_dispense_medications"])]);
        assert!(flagged.grants(Role::Provider, Flag::DispenseMedications, Some("c1")));
        // Rows exist, but none for c2: nothing is granted there.
        assert!(!flagged.grants(Role::Provider, Flag::DispenseMedications, Some("c2")));
        // No rows: the role's defaults, at the user's own clinic only.
        let home = ClinicFlags::default().at_home(Some("c1".into()));
        assert!(home.grants(Role::Admin, Flag::ClinicAdmin, Some("c1")));
        assert!(!home.grants(Role::Admin, Flag::ClinicAdmin, Some("c2")));
        assert!(home.grants(Role::Admin, Flag::ClinicAdmin, None));
        let admin_of_c2 = ClinicFlags::new([row("c2", &["is_clinic_admin"])]);
        assert!(admin_of_c2.grants(Role::Provider, Flag::DispenseMedications, Some("c2")));
        assert!(admin_of_c2.grants(Role::SuperAdmin, Flag::ViewHistory, Some("c9")));
    }

    #[test]
    fn only_admins_manage_users_devices_and_read_the_log() {
        for role in [Role::Registrar, Role::Provider, Role::Pharmacist] {
            for permission in [
                Permission::ManageUsers,
                Permission::ManageDevices,
                Permission::ReadAudit,
            ] {
                assert!(!role.may(permission), "{role} {permission}");
            }
        }
        assert!(Role::Admin.may(Permission::ManageDevices));
        assert_eq!(needed("_access_log", Access::Read), Permission::ReadAudit);
        assert_eq!(needed("users", Access::Read), Permission::ManageUsers);
    }
}
