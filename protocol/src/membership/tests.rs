use super::*;
use proptest::prelude::*;

const NOW: i64 = 1_780_000_000_000;

fn key(seed: u8) -> OwnerKey {
    OwnerKey::from_seed([seed; 32])
}

fn cert_for(owner: &OwnerKey, peer: &str) -> SignedCert {
    owner
        .issue(DeviceCert::new(peer, "tablet 1", DeviceKind::Tablet, NOW))
        .expect("issue")
}

#[test]
fn a_certificate_is_checked_against_root_peer_expiry_and_revocation() {
    let owner = key(1);
    let root = owner.root();
    let cert = cert_for(&owner, "12D3KooWA");
    let body = root
        .check_cert(&cert, "12D3KooWA", NOW, |_| false)
        .expect("valid");
    assert_eq!(body.name, "tablet 1");
    assert_eq!(body.kind, DeviceKind::Tablet);

    assert_eq!(
        root.check_cert(&cert, "12D3KooWB", NOW, |_| false),
        Err(TrustError::OtherPeer {
            cert_peer: "12D3KooWA".into()
        }),
        "presented by another device"
    );
    assert_eq!(
        root.check_cert(&cert, "12D3KooWA", NOW, |p| p == "12D3KooWA"),
        Err(TrustError::Revoked)
    );
    assert_eq!(
        key(2).root().check_cert(&cert, "12D3KooWA", NOW, |_| false),
        Err(TrustError::OtherMesh("certificate")),
        "another mesh's root"
    );

    let mut expiring = DeviceCert::new("12D3KooWA", "t", DeviceKind::Gateway, NOW);
    expiring.expires_at = Some(NOW + 1000);
    let expiring = owner.issue(expiring).expect("issue");
    assert!(
        root.check_cert(&expiring, "12D3KooWA", NOW, |_| false)
            .is_ok()
    );
    assert_eq!(
        root.check_cert(&expiring, "12D3KooWA", NOW + 1000, |_| false),
        Err(TrustError::Expired { at: NOW + 1000 })
    );
}

#[test]
fn a_certificate_signed_by_a_member_claiming_the_root_is_refused() {
    let owner = key(1);
    let forger = key(3);
    // A member who knows the root writes a certificate naming it but signs with its own key.
    let mut body = DeviceCert::new("12D3KooWX", "mine", DeviceKind::Admin, NOW);
    body.root = ByteBuf::from(owner.root().to_bytes().to_vec());
    let bytes = encode(&body);
    let forged = SignedCert {
        sig: ByteBuf::from(forger.sign(CERT_LABEL, &bytes)),
        body: ByteBuf::from(bytes),
    };
    assert_eq!(
        owner
            .root()
            .check_cert(&forged, "12D3KooWX", NOW, |_| false),
        Err(TrustError::BadSignature("certificate"))
    );
    // An altered genuine certificate.
    let genuine = cert_for(&owner, "12D3KooWA");
    let mut altered: DeviceCert = decode(&genuine.body, "c").expect("decode");
    altered.kind = DeviceKind::Admin;
    let altered = SignedCert {
        body: ByteBuf::from(encode(&altered)),
        sig: genuine.sig.clone(),
    };
    assert_eq!(
        owner
            .root()
            .check_cert(&altered, "12D3KooWA", NOW, |_| false),
        Err(TrustError::BadSignature("certificate"))
    );
}

#[test]
fn revocations_verify_only_under_the_owner() {
    let owner = key(1);
    let revocation = owner.revoke("12D3KooWA", "stolen", NOW).expect("revoke");
    let text = revocation.to_text();
    let back = SignedRevocation::from_text(&text).expect("text");
    let body = owner.root().open_revocation(&back).expect("valid");
    assert_eq!(body.peer_id, "12D3KooWA");
    assert_eq!(body.reason, "stolen");
    assert!(key(2).root().open_revocation(&back).is_err());
    let forged = key(2).revoke("12D3KooWA", "x", NOW).expect("revoke");
    assert!(owner.root().open_revocation(&forged).is_err());
}

#[test]
fn invites_round_trip_and_bad_ones_are_named() {
    let invite = Invite {
        root: ByteBuf::from(key(1).root().to_bytes().to_vec()),
        token: ByteBuf::from(vec![7; 32]),
        inviter: "12D3KooWA".into(),
        addrs: vec!["/ip4/192.168.1.20/tcp/7401".into()],
        expires_at: NOW,
    };
    let text = invite.to_text();
    assert!(
        text.len() < 400,
        "short enough for a QR code: {}",
        text.len()
    );
    assert_eq!(Invite::from_text(&text), Ok(invite.clone()));
    assert_eq!(Invite::from_text(&format!("  {text}\n")), Ok(invite));
    assert!(matches!(
        Invite::from_text("hello"),
        Err(TrustError::NotThis { .. })
    ));
    assert_eq!(
        Invite::from_text(&text[..60]),
        Err(TrustError::Damaged("invite"))
    );
    assert_eq!(
        Invite::from_text(&format!("{OLD_INVITE_PREFIX}{}", "ab".repeat(32))),
        Err(TrustError::OldInvite)
    );
}

#[test]
fn discovery_tags_change_every_period_and_only_members_recognise_them() {
    let root = key(1).root();
    let now = 1_780_000_000_000u64;
    let tag = root.discovery_tag(now);
    assert_eq!(tag.len(), 16);
    assert_ne!(tag, root.discovery_tag(now + DISCOVERY_PERIOD_MS));
    assert!(root.recognises(&tag, now + DISCOVERY_PERIOD_MS / 2));
    assert!(!root.recognises(&tag, now + 3 * DISCOVERY_PERIOD_MS));
    assert!(!key(2).root().recognises(&tag, now));
    assert!(!tag.contains(&root.fingerprint()));
}

#[test]
fn a_sealed_peer_id_opens_only_for_members_and_adverts_share_nothing() {
    let root = key(1).root();
    let now = 1_780_000_000_000u64;
    let peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";
    let a = root.seal_peer(peer, now, [1; 8]).expect("seal");
    let b = root.seal_peer(peer, now, [2; 8]).expect("seal");
    assert!(!a.contains(peer) && a != b, "fresh per advert");
    let period = root
        .tag_period(&root.discovery_tag(now), now)
        .expect("our tag");
    assert_eq!(root.open_peer(&a, period).as_deref(), Some(peer));
    assert_eq!(root.open_peer(&b, period).as_deref(), Some(peer));
    assert_eq!(key(2).root().open_peer(&a, period), None, "another mesh");
    assert_eq!(root.open_peer("zz", period), None);
    assert_eq!(root.open_peer(&a[..10], period), None);
    // Two devices' sealed ids XORed give nothing stable: their nonces differ.
    let other = "12D3KooWRuHvS6Fh2hU5nHd3fWm7uxJ9Gz9rP1ByqUoZJ1ywX8kv";
    let c = root
        .seal_peer(other, now + DISCOVERY_PERIOD_MS, [3; 8])
        .expect("seal");
    let d = root
        .seal_peer(other, now + DISCOVERY_PERIOD_MS, [4; 8])
        .expect("seal");
    assert_ne!(c[16..], d[16..]);
}

#[test]
fn an_upgraded_mesh_derives_the_same_owner_on_every_device() {
    let a = MeshSecret::from_bytes([5; 32]).owner_key();
    let b = MeshSecret::from_bytes([5; 32]).owner_key();
    assert_eq!(a.root(), b.root());
    assert_ne!(a.root(), MeshSecret::from_bytes([6; 32]).owner_key().root());
}

proptest! {
    #[test]
    fn certificates_round_trip_through_text(
        peer in "[1-9A-HJ-NP-Za-km-z]{10,60}",
        name in "\\PC{0,40}",
        clinics in proptest::collection::vec("[a-z0-9-]{1,36}", 0..5),
        expires in proptest::option::of(0i64..i64::MAX),
    ) {
        let owner = key(9);
        let mut body = DeviceCert::new(&peer, &name, DeviceKind::Tablet, NOW);
        body.clinics = clinics.clone();
        body.expires_at = expires;
        let cert = owner.issue(body).expect("issue");
        let back = SignedCert::from_text(&cert.to_text()).expect("text");
        prop_assert_eq!(&back, &cert);
        let opened = owner.root().open_cert(&back).expect("open");
        prop_assert_eq!(opened.clinics, clinics);
        prop_assert_eq!(opened.peer_id, peer);
    }

    #[test]
    fn any_text_is_refused_with_an_error_not_a_panic(text in "\\PC{0,300}") {
        let _ = Invite::from_text(&text);
        let _ = SignedCert::from_text(&text);
        let _ = SignedRevocation::from_text(&text);
    }

    #[test]
    fn any_flipped_byte_of_a_certificate_is_refused(index in 0usize..400, bit in 0u8..8) {
        let owner = key(4);
        let cert = cert_for(&owner, "12D3KooWA");
        let mut bytes = cert.to_bytes();
        let index = index % bytes.len();
        bytes[index] ^= 1 << bit;
        if let Ok(changed) = SignedCert::from_bytes(&bytes) && changed != cert {
            prop_assert!(owner.root().check_cert(&changed, "12D3KooWA", NOW, |_| false).is_err());
        }
    }
}
