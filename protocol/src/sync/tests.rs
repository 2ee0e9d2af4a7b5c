//! Tests of the parent module.
use super::*;
use crate::membership::{DeviceKind, OwnerKey, RevokedSet};
use crate::wire::WantChanges;
use proptest::prelude::*;

/// A credential of the mesh whose owner seed is `mesh`, certifying `peer`.
pub(crate) fn credential(mesh: u8, peer: &str, expires_at: Option<i64>) -> Credential {
    let owner = OwnerKey::from_seed([mesh; 32]);
    let mut cert = DeviceCert::new(peer, peer, DeviceKind::Tablet, 0);
    cert.expires_at = expires_at;
    Credential {
        root: owner.root(),
        cert: owner.issue(cert).expect("issue"),
        revoked: RevokedSet::default(),
    }
}

fn session_with(name: &str, other: &str, credential: Credential) -> Session {
    Session::new(SessionConfig {
        local_peer: name.into(),
        remote_peer: other.into(),
        credential,
        nonce: vec![name.len() as u8; 32],
        local_epoch: format!("{name}-epoch"),
        cursor: None,
    })
}

fn session(name: &str, other: &str) -> Session {
    session_with(name, other, credential(3, name, None))
}

fn sent(outputs: &[Output]) -> Vec<Message> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// Two sessions after a successful handshake.
fn open_pair() -> (Session, Session) {
    let mut a = session("A", "B");
    let mut b = session("B", "A");
    let mut to_b = sent(&a.start());
    let mut to_a = sent(&b.start());
    for _ in 0..4 {
        let next_b: Vec<Message> = to_b
            .drain(..)
            .flat_map(|m| sent(&b.handle(Input::Message(m), 0)))
            .collect();
        let next_a: Vec<Message> = to_a
            .drain(..)
            .flat_map(|m| sent(&a.handle(Input::Message(m), 0)))
            .collect();
        to_a = next_b;
        to_b = next_a;
    }
    assert!(a.is_open() && b.is_open());
    (a, b)
}

/// Runs the handshake of `a` (which checks) against `b` (which presents), both at
/// `now`; answers why `a` closed, if it did.
fn handshake(mut a: Session, mut b: Session, now: u64) -> Option<String> {
    let mut to_b = sent(&a.start());
    let mut to_a = sent(&b.start());
    let mut closed = None;
    for _ in 0..4 {
        let mut next_b = Vec::new();
        for m in to_b.drain(..) {
            next_b.extend(sent(&b.handle(Input::Message(m), now)));
        }
        let mut next_a = Vec::new();
        for m in to_a.drain(..) {
            for o in a.handle(Input::Message(m), now) {
                match o {
                    Output::Send(m) => next_a.push(m),
                    Output::Close { reason } => closed = Some(reason),
                    _ => {}
                }
            }
        }
        to_a = next_b;
        to_b = next_a;
    }
    if closed.is_none() {
        assert!(a.is_open(), "neither open nor closed");
    }
    closed
}

#[test]
fn the_handshake_admits_only_a_valid_unrevoked_certificate_of_the_peer_itself() {
    let now = 5_000;
    // Valid.
    assert_eq!(handshake(session("A", "B"), session("B", "A"), now), None);
    // Expired.
    let reason = handshake(
        session("A", "B"),
        session_with("B", "A", credential(3, "B", Some(now as i64 - 1))),
        now,
    )
    .expect("refused");
    assert!(reason.contains("expired"), "{reason}");
    // Revoked (A learned the revocation of B).
    let checker = credential(3, "A", None);
    checker.revoked.insert("B", 0);
    let reason =
        handshake(session_with("A", "B", checker), session("B", "A"), now).expect("refused");
    assert!(reason.contains("revoked"), "{reason}");
    // Signed by the owner of another mesh that gives itself the same fingerprint: the
    // Hello passes only when the fingerprints are equal, so present another root's
    // certificate after a genuine Hello.
    let mut a = session("A", "B");
    let mut b = session("B", "A");
    a.start();
    a.handle(Input::Message(sent(&b.start()).remove(0)), now);
    let foreign = credential(4, "B", None).cert;
    let out = a.handle(
        Input::Message(Message::Proof(Proof::Certificate {
            cert: ByteBuf::from(foreign.to_bytes()),
        })),
        now,
    );
    assert!(a.is_closed());
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Close { reason } if reason.contains("another mesh"))),
        "{out:?}"
    );
    // Another mesh altogether is refused at its Hello.
    let reason = handshake(
        session("A", "B"),
        session_with("B", "A", credential(4, "B", None)),
        now,
    )
    .expect("refused");
    assert!(reason.contains("another mesh"), "{reason}");
    // The certificate of another device (C's, which is public), presented by B.
    let reason = handshake(
        session("A", "B"),
        session_with("B", "A", credential(3, "C", None)),
        now,
    )
    .expect("refused");
    assert!(reason.contains("is for device C"), "{reason}");
    // No certificate: bytes that are not one.
    for junk in [vec![], vec![0xa0], vec![7; 300]] {
        let mut a = session("A", "B");
        let mut b = session("B", "A");
        a.start();
        a.handle(Input::Message(sent(&b.start()).remove(0)), now);
        let out = a.handle(
            Input::Message(Message::Proof(Proof::Certificate {
                cert: ByteBuf::from(junk),
            })),
            now,
        );
        assert!(a.is_closed());
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Close { reason } if reason.contains("prove"))),
            "{out:?}"
        );
    }
}

#[test]
fn messages_before_the_handshake_close_the_session() {
    let mut a = session("A", "B");
    a.start();
    let out = a.handle(
        Input::Message(Message::Want {
            req: 1,
            whole: vec![],
            changes: vec![],
        }),
        0,
    );
    assert!(a.is_closed());
    assert!(matches!(out.last(), Some(Output::Close { .. })));
}

#[test]
fn a_feeder_never_runs_more_than_a_window_ahead() {
    let (mut a, _) = open_pair();
    let mut reads = 0;
    let mut heads = Vec::new();
    // B subscribed during the handshake: A's first read is outstanding.
    let mut out = vec![Output::ReadFeed {
        after: 0,
        limit: PAGE,
    }];
    for _ in 0..20 {
        let Some(Output::ReadFeed { after, .. }) = out
            .iter()
            .find(|o| matches!(o, Output::ReadFeed { .. }))
            .cloned()
        else {
            break;
        };
        reads += 1;
        let entries: Vec<FeedItem> = (after + 1..=after + PAGE as u64)
            .map(|seq| FeedItem {
                seq,
                id: DocId::new_v7(),
                collection: "patients".into(),
                heads: ByteBuf::from(vec![1; 32]),
                payload: None,
                payload_sigs: Default::default(),
            })
            .collect();
        out = a.handle(
            Input::FeedRead {
                entries: entries.into_iter().map(Into::into).collect(),
                last_seq: after + PAGE as u64,
                head: 1_000_000,
            },
            0,
        );
        heads.extend(sent(&out).iter().filter_map(|m| match m {
            Message::Feed { head, .. } => Some(*head),
            _ => None,
        }));
    }
    assert_eq!(reads, WINDOW, "no acknowledgement, no more pages");
    assert_eq!(
        heads,
        vec![1_000_000; WINDOW],
        "every feed page tells the sender's newest position"
    );
    out = a.handle(Input::Message(Message::Ack { upto: PAGE as u64 }), 0);
    assert!(
        out.iter().any(|o| matches!(o, Output::ReadFeed { .. })),
        "an acknowledgement lets one more page go"
    );
}

fn message() -> impl Strategy<Value = Message> {
    let id = any::<[u8; 16]>().prop_map(DocId::from_bytes);
    let bytes = prop::collection::vec(any::<u8>(), 0..80).prop_map(ByteBuf::from);
    prop_oneof![
        (any::<u16>(), ".{0,20}", bytes.clone(), ".{0,8}").prop_map(
            |(version, mesh, nonce, feed_epoch)| Message::Hello(Hello {
                version,
                mesh,
                nonce,
                feed_epoch
            })
        ),
        bytes
            .clone()
            .prop_map(|mac| Message::Proof(Proof::Certificate { cert: mac })),
        ".{0,8}".prop_map(|reason| Message::Refuse { reason }),
        (".{0,8}", any::<u64>()).prop_map(|(epoch, since)| Message::Subscribe { epoch, since }),
        (
            prop::collection::vec((any::<u64>(), id.clone(), bytes.clone()), 0..8),
            any::<u64>()
        )
            .prop_map(|(e, upto)| Message::Feed {
                entries: e
                    .into_iter()
                    .map(|(seq, id, heads)| FeedItem {
                        seq,
                        id,
                        collection: "patients".into(),
                        heads,
                        payload: None,
                        payload_sigs: Default::default(),
                    })
                    .collect(),
                upto,
                more: false,
                head: upto,
            }),
        (
            any::<u64>(),
            prop::collection::vec(id.clone(), 0..4),
            prop::collection::vec((id.clone(), bytes.clone()), 0..4)
        )
            .prop_map(|(req, whole, ch)| Message::Want {
                req,
                whole,
                changes: ch
                    .into_iter()
                    .map(|(id, heads)| WantChanges {
                        id,
                        heads,
                        have: None,
                    })
                    .collect()
            }),
        (
            any::<u64>(),
            prop::collection::vec((id.clone(), bytes.clone()), 0..4),
            any::<bool>()
        )
            .prop_map(|(req, docs, done)| Message::Docs {
                diverged: Vec::new(),
                req,
                docs: docs
                    .into_iter()
                    .map(|(id, bytes)| DocPayload {
                        id,
                        collection: "visits".into(),
                        bytes,
                        heads: ByteBuf::new(),
                        sigs: ByteBuf::from(vec![0; 97]),
                    })
                    .collect(),
                done
            }),
        (any::<u64>(), id, any::<u64>(), bytes).prop_map(|(req, id, total, bytes)| {
            Message::DocPart {
                req,
                id,
                collection: "x".into(),
                total,
                bytes,
                heads: ByteBuf::new(),
                sigs: ByteBuf::new(),
            }
        }),
        any::<u64>().prop_map(|upto| Message::Ack { upto }),
        (any::<u64>(), any::<bool>()).prop_map(|(round, reply)| Message::Summary {
            round,
            summary: crate::wire::Summary::default(),
            reply,
        }),
        (any::<u64>(), any::<u8>()).prop_map(|(round, bucket)| Message::WantRange {
            round,
            bucket,
            after: None,
        }),
        (any::<u64>(), any::<u8>(), any::<bool>()).prop_map(|(round, bucket, more)| {
            Message::Range {
                round,
                bucket,
                entries: Vec::new(),
                more,
            }
        }),
    ]
}

/// Drives one open session as the puller through a page whose only document diverged.
#[test]
fn a_diverged_document_is_asked_again_with_a_summary_then_whole() {
    let (mut a, _) = open_pair();
    let id = DocId::new_v7();
    let entry = FeedItem {
        seq: 1,
        id,
        collection: "patients".into(),
        heads: ByteBuf::from(vec![9; 32]),
        payload: None,
        payload_sigs: Default::default(),
    };
    let out = a.handle(
        Input::Message(Message::Feed {
            entries: vec![entry],
            upto: 1,
            more: false,
            head: 1,
        }),
        0,
    );
    let page = out
        .iter()
        .find_map(|o| match o {
            Output::CheckDocs { page, .. } => Some(*page),
            _ => None,
        })
        .expect("check");
    let behind = WantChanges {
        id,
        heads: ByteBuf::from(vec![1; 32]),
        have: None,
    };
    let out = a.handle(
        Input::Checked {
            page,
            missing: vec![],
            behind: vec![behind],
        },
        0,
    );
    let Some(Message::Want { req, .. }) = sent(&out).pop() else {
        panic!("a want");
    };
    let out = a.handle(
        Input::Message(Message::Docs {
            req,
            docs: vec![],
            done: true,
            diverged: vec![id],
        }),
        0,
    );
    let (req2, ids) = out
        .iter()
        .find_map(|o| match o {
            Output::PrepareHave { req, ids } => Some((*req, ids.clone())),
            _ => None,
        })
        .expect("asks for a summary of its changes");
    assert_eq!(ids, vec![id]);
    assert!(
        !out.iter().any(|o| matches!(o, Output::SaveCursor(_))),
        "the page is not done"
    );
    let out = a.handle(
        Input::HaveReady {
            req: req2,
            changes: vec![WantChanges {
                id,
                heads: ByteBuf::from(vec![1; 32]),
                have: Some(ByteBuf::from(vec![1, 2])),
            }],
            whole: vec![],
        },
        0,
    );
    assert!(matches!(sent(&out).pop(), Some(Message::Want { req, .. }) if req == req2));
    // Still not answerable: the document is taken whole.
    let out = a.handle(
        Input::Message(Message::Docs {
            req: req2,
            docs: vec![],
            done: true,
            diverged: vec![id],
        }),
        0,
    );
    let Some(Message::Want {
        req: req3, whole, ..
    }) = sent(&out).pop()
    else {
        panic!("a want for the whole document");
    };
    assert_eq!(whole, vec![id]);
    let doc = DocPayload {
        id,
        collection: "patients".into(),
        bytes: ByteBuf::from(vec![1]),
        heads: ByteBuf::new(),
        sigs: ByteBuf::new(),
    };
    let out = a.handle(
        Input::Message(Message::Docs {
            req: req3,
            docs: vec![doc],
            done: true,
            diverged: vec![],
        }),
        0,
    );
    assert!(out.iter().any(|o| matches!(o, Output::StoreDocs { .. })));
    let out = a.handle(Input::Stored { req: req3 }, 0);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::SaveCursor(c) if c.seq == 1)),
        "{out:?}"
    );
}

#[test]
fn documents_nobody_asked_for_are_refused() {
    let (mut a, _) = open_pair();
    let out = a.handle(
        Input::Message(Message::Docs {
            req: 77,
            docs: vec![],
            done: true,
            diverged: vec![],
        }),
        0,
    );
    assert!(a.is_closed(), "{out:?}");
}

#[test]
fn equal_summaries_end_a_round_at_once_and_answer_verify() {
    let (mut a, mut b) = open_pair();
    let out = a.handle(Input::Verify { token: 5 }, 0);
    assert!(out.contains(&Output::ComputeSummary));
    let mut summary = crate::wire::Summary::default();
    summary.add(&DocId::new_v7(), &[[1; 32]], false);
    summary.seal();
    let to_b = sent(&a.handle(
        Input::SummaryComputed {
            summary: summary.clone(),
        },
        0,
    ));
    let mut to_a = Vec::new();
    for m in to_b {
        let out = b.handle(Input::Message(m), 0);
        assert!(out.contains(&Output::ComputeSummary));
        to_a.extend(sent(&b.handle(
            Input::SummaryComputed {
                summary: summary.clone(),
            },
            0,
        )));
    }
    let mut verified = None;
    for m in to_a {
        for o in a.handle(Input::Message(m), 0) {
            if let Output::Verified { token, report } = o {
                verified = Some((token, report));
            }
        }
    }
    let (token, report) = verified.expect("verified");
    assert_eq!(token, 5);
    assert_eq!(report.differing_buckets, 0);
    assert_eq!(report.local_count, 1);
}

#[test]
fn summaries_name_the_buckets_that_differ() {
    use crate::wire::Summary;
    let ids: Vec<DocId> = (0..50).map(|_| DocId::new_v7()).collect();
    let mut a = Summary::default();
    let mut b = Summary::default();
    for id in &ids {
        a.add(id, &[[1; 32], [2; 32]], false);
        b.add(id, &[[2; 32], [1; 32]], false);
    }
    a.seal();
    b.seal();
    assert!(a.differing(&b).is_empty(), "order of heads does not matter");
    assert!(a.same_as(&b.root_only()));
    b.add(&ids[0], &[[2; 32], [1; 32]], false);
    b.add(&ids[0], &[[3; 32]], false);
    b.seal();
    assert_eq!(a.differing(&b), vec![Summary::bucket_of(&ids[0])]);
    assert!(!a.same_as(&b));
    let mut held = Summary::default();
    let mut merged = Summary::default();
    held.add(&ids[1], &[[1; 32]], true);
    merged.add(&ids[1], &[[1; 32]], false);
    held.seal();
    merged.seal();
    assert_eq!(
        held.differing(&merged).len(),
        1,
        "held is not the same as merged"
    );
}

proptest! {
    #[test]
    fn any_sequence_of_messages_from_a_peer_never_panics(messages in prop::collection::vec(message(), 0..40), open in any::<bool>()) {
        let mut s = if open { open_pair().0 } else { let mut s = session("A", "B"); s.start(); s };
        for m in messages {
            let out = s.handle(Input::Message(m), 0);
            prop_assert!(out.len() < 64, "bounded outputs per input");
            if s.is_closed() {
                let after = s.handle(Input::Message(Message::Ack { upto: 1 }), 0);
                prop_assert!(after.is_empty(), "a closed session does nothing");
                break;
            }
        }
    }
}

#[test]
fn a_receiver_tells_how_far_it_has_come_in_the_peers_feed() {
    let (_, mut b) = open_pair();
    let page = |upto: u64, head: u64, more: bool| {
        Input::Message(Message::Feed {
            entries: Vec::new(),
            upto,
            more,
            head,
        })
    };
    assert_eq!(b.progress(), None, "nothing announced yet");
    b.handle(page(100, 1_000, true), 1_000);
    assert_eq!(
        b.progress(),
        Some(Progress {
            received: 100,
            announced: 1_000,
            elapsed_ms: 0
        })
    );
    b.handle(page(400, 1_000, true), 3_000);
    assert_eq!(
        b.progress(),
        Some(Progress {
            received: 400,
            announced: 1_000,
            elapsed_ms: 2_000
        })
    );
    b.handle(page(1_000, 1_000, false), 4_000);
    assert_eq!(b.progress(), None, "caught up: no progress to show");
    // A peer that overstates its head shows no progress once it says this node is
    // caught up.
    b.handle(page(1_001, 9_999_999, false), 4_500);
    assert_eq!(b.progress(), None, "an overstated head is not shown");
    // A later stretch (days apart) counts from where this copy stood.
    b.handle(page(1_005, 1_500, true), 9_000);
    assert_eq!(
        b.progress(),
        Some(Progress {
            received: 4,
            announced: 499,
            elapsed_ms: 0
        })
    );
}
