//! Certificates, revocations, invites and enrollment messages as they arrive from other
//! devices or are pasted by people: any bytes or text give a value or an error, never a
//! panic, and nothing but the owner's signature opens. Change signatures as a peer sends
//! them decode to entries or an error.

#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::membership::{
    EnrollAnswer, EnrollRequest, Invite, OwnerKey, SignedCert, SignedRevocation, decode_enroll,
};

fuzz_target!(|data: &[u8]| {
    let root = OwnerKey::from_seed([3; 32]).root();
    if let Ok(cert) = SignedCert::from_bytes(data) {
        let _ = root.check_cert(&cert, "12D3KooWA", 0, |_| false);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(cert) = SignedCert::from_text(&text) {
        let _ = root.open_cert(&cert);
    }
    if let Ok(revocation) = SignedRevocation::from_text(&text) {
        let _ = root.open_revocation(&revocation);
    }
    if let Ok(invite) = Invite::from_text(&text) {
        let _ = invite.root();
        let _ = invite.token_hash();
    }
    if let Ok(decoded) = medmesh_protocol::authorship::decode(data) {
        // Entries and seals may come in any order; encoded again (entries first), they
        // decode to the same.
        let mut again = medmesh_protocol::authorship::encode(&decoded.entries);
        for seal in &decoded.seals {
            medmesh_protocol::authorship::encode_seal_into(seal, &mut again);
        }
        assert_eq!(again.len(), data.len());
        assert_eq!(medmesh_protocol::authorship::decode(&again), Ok(decoded));
    }
    let _ = decode_enroll::<EnrollRequest>(data);
    let _ = decode_enroll::<EnrollAnswer>(data);
});
