//! The hub RPC's cryptography against known answers made by an independent
//! implementation (pyca/cryptography over OpenSSL; `vectors/hub_vectors.py`).

use medmesh_protocol::hub::{Aad, HubKey, b64, open, seal_with_nonce, unb64};
use serde_json::Value;

fn bytes32(v: &Value) -> [u8; 32] {
    unb64(v.as_str().expect("text"))
        .expect("base64url")
        .try_into()
        .expect("32 bytes")
}

#[test]
fn keys_and_sealed_payloads_match_an_independent_implementation() {
    let vectors: Value =
        serde_json::from_str(include_str!("vectors/hub_vectors.json")).expect("vectors");
    let cases = vectors["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let hub = HubKey::from_bytes(&bytes32(&case["hub_secret"])).expect("hub key");
        assert_eq!(b64(&hub.public()), case["hub_public"]);
        let client = HubKey::from_bytes(&bytes32(&case["client_secret"])).expect("client key");
        assert_eq!(b64(&client.public()), case["client_public"]);
        let key = hub
            .session_key(&unb64(case["client_public"].as_str().expect("text")).expect("key"))
            .expect("hub side");
        assert_eq!(
            b64(&key),
            case["session_key"],
            "the hub derives the same key"
        );
        assert_eq!(
            client
                .client_session_key(&hub.public())
                .expect("client side"),
            key,
            "the client derives it too"
        );
        for sealed in case["sealed"].as_array().expect("sealed") {
            let aad = match sealed["aad"].as_str() {
                Some("command") => Aad::Command,
                Some("command_response") => Aad::CommandResponse,
                Some("query") => Aad::Query,
                Some("query_response") => Aad::QueryResponse,
                other => panic!("unknown aad {other:?}"),
            };
            let nonce: [u8; 12] = unb64(sealed["nonce"].as_str().expect("nonce"))
                .expect("nonce")
                .try_into()
                .expect("12 bytes");
            let plain = sealed["plaintext"].as_str().expect("plaintext");
            assert_eq!(
                seal_with_nonce(&key, &nonce, aad, plain.as_bytes()).expect("seal"),
                sealed["sealed"],
                "sealed as the independent implementation seals it"
            );
            let (opened, got_nonce) =
                open(&key, aad, sealed["sealed"].as_str().expect("sealed")).expect("opens");
            assert_eq!(opened, plain.as_bytes());
            assert_eq!(got_nonce, nonce);
        }
    }
}
