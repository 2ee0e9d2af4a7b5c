//! Pharmacy identities that every device must compute alike: normalized drug names and
//! the deterministic ids of drugs and stock items.
//!
//! Two tablets that, while apart, both create "Paracetamol 500mg tablets" and
//! "paracetamol 500 MG  Tablets" must end up with one drug; two that both receive batch
//! "b-12" of it at one clinic must end up with one stock item. So the id is derived from
//! the normalized name (or the clinic, drug and normalized batch), hashed into a UUID
//! (version 8, SHA-256 based), never drawn at random.

use crate::DocId;

/// Unit spellings and the form each is written in after normalization.
const UNITS: &[(&str, &str)] = &[
    ("mg", "mg"),
    ("milligram", "mg"),
    ("milligrams", "mg"),
    ("g", "g"),
    ("gram", "g"),
    ("grams", "g"),
    ("mcg", "mcg"),
    ("µg", "mcg"),
    ("ug", "mcg"),
    ("microgram", "mcg"),
    ("micrograms", "mcg"),
    ("ml", "ml"),
    ("milliliter", "ml"),
    ("millilitre", "ml"),
    ("milliliters", "ml"),
    ("millilitres", "ml"),
    ("l", "l"),
    ("iu", "iu"),
    ("units", "iu"),
    ("%", "%"),
];

/// Dosage-form words and their singular.
const FORMS: &[(&str, &str)] = &[
    ("tablets", "tablet"),
    ("tabs", "tablet"),
    ("tab", "tablet"),
    ("capsules", "capsule"),
    ("caps", "capsule"),
    ("cap", "capsule"),
    ("injections", "injection"),
    ("inj", "injection"),
    ("syrups", "syrup"),
    ("suspensions", "suspension"),
    ("drops", "drop"),
    ("sachets", "sachet"),
    ("vials", "vial"),
    ("ampoules", "ampoule"),
];

/// A drug name as every device compares it: lower case, one space between words, a
/// space between a number and its unit, units and forms spelled one way
/// ("Paracetamol 500mg tablets" → "paracetamol 500 mg tablet").
pub fn normalize_drug_name(name: &str) -> String {
    // Split digits from letters ("500mg" → "500 mg"), keeping decimals ("2.5ml").
    let mut spaced = String::with_capacity(name.len() + 8);
    let mut previous: Option<char> = None;
    for c in name.trim().chars().flat_map(char::to_lowercase) {
        if let Some(p) = previous {
            let boundary = (p.is_ascii_digit() && (c.is_alphabetic() || c == '%' || c == 'µ'))
                || (p.is_alphabetic() && c.is_ascii_digit());
            if boundary {
                spaced.push(' ');
            }
        }
        spaced.push(c);
        previous = Some(c);
    }
    let words: Vec<String> = spaced
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|w| !w.is_empty())
        .map(|word| {
            UNITS
                .iter()
                .chain(FORMS)
                .find(|(spelling, _)| *spelling == word)
                .map_or_else(|| word.to_owned(), |(_, canonical)| (*canonical).to_owned())
        })
        .collect();
    words.join(" ")
}

/// A batch number as every device compares it: trimmed, upper case, inner spaces dropped.
pub fn normalize_batch(batch: &str) -> String {
    batch
        .trim()
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_uppercase)
        .collect()
}

/// The id of the drug with this name (any spelling that normalizes alike).
pub fn drug_id(name: &str) -> DocId {
    DocId::derived("drug", &[&normalize_drug_name(name)])
}

/// The id of the stock item of a drug's batch at a clinic.
pub fn stock_item_id(clinic_id: &str, drug_id: &str, batch_number: &str) -> DocId {
    DocId::derived(
        "stock",
        &[clinic_id, drug_id, &normalize_batch(batch_number)],
    )
}

/// The internal collection of stock ledgers: the movements of a stock item, as counters
/// (`delta`: units in or out, `movements`: how many), one ledger per device and stretch
/// of [`LEDGER_MOVEMENTS`] movements. A stock item's quantity is its own counter plus
/// the `delta` of every ledger of it. A document's cost grows with its history, so a
/// stock item dispensed a hundred thousand times must not be one document: its
/// movements go to ledgers that each stay small.
pub const STOCK_LEDGERS: &str = "_stock_ledgers";

/// Movements a device writes into one ledger before it starts the next.
pub const LEDGER_MOVEMENTS: i64 = 500;

/// The id of a device's `index`th ledger of a stock item (the same on every device, so
/// a store restored from a backup carries on in the same ledger).
pub fn stock_ledger_id(stock_item_id: &DocId, device: &str, index: i64) -> DocId {
    DocId::derived(
        "stock-ledger",
        &[&stock_item_id.to_string(), device, &index.to_string()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_drug_normalize_alike() {
        let a = normalize_drug_name("Paracetamol 500mg tablets");
        assert_eq!(a, "paracetamol 500 mg tablet");
        assert_eq!(normalize_drug_name("paracetamol 500 MG  Tablets"), a);
        assert_eq!(normalize_drug_name("  PARACETAMOL 500 milligrams tabs "), a);
        assert_eq!(
            drug_id("Paracetamol 500mg tablets"),
            drug_id("paracetamol 500 MG  Tablets")
        );
        assert_ne!(drug_id("Paracetamol 500mg"), drug_id("Paracetamol 250mg"));
        assert_eq!(
            normalize_drug_name("Amoxicillin 250mg/5ml suspension"),
            "amoxicillin 250 mg/5 ml suspension"
        );
    }

    #[test]
    fn stock_items_are_keyed_by_clinic_drug_and_batch() {
        assert_eq!(
            stock_item_id("c", "d", "b-12 x"),
            stock_item_id("c", "d", " B-12X")
        );
        assert_ne!(
            stock_item_id("c", "d", "B1"),
            stock_item_id("c2", "d", "B1")
        );
        assert_ne!(
            stock_item_id("c", "d", "B1"),
            stock_item_id("c", "d2", "B1")
        );
        // Parts cannot run into each other.
        assert_ne!(stock_item_id("ab", "c", "d"), stock_item_id("a", "bc", "d"));
    }
}
