//! Tests of the parent module.
use super::*;
use crate::membership::MeshSecret;
use crate::wire::WantChanges;
use proptest::prelude::*;

fn session(name: &str, other: &str) -> Session {
    Session::new(SessionConfig {
        local_peer: name.into(),
        remote_peer: other.into(),
        credential: Credential::SharedSecret(MeshSecret::from_bytes([3; 32])),
        nonce: vec![name.len() as u8; 32],
        local_epoch: format!("{name}-epoch"),
        cursor: None,
    })
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

#[test]
fn a_wrong_proof_is_refused() {
    let mut a = session("A", "B");
    a.start();
    let mut b = session("B", "A");
    let hello = sent(&b.start()).remove(0);
    a.handle(Input::Message(hello), 0);
    let out = a.handle(
        Input::Message(Message::Proof(Proof::SharedSecret {
            mac: ByteBuf::from(vec![0; 32]),
        })),
        0,
    );
    assert!(a.is_closed());
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Close { reason } if reason.contains("prove")))
    );
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
            })
            .collect();
        out = a.handle(
            Input::FeedRead {
                entries,
                last_seq: after + PAGE as u64,
                head: 1_000_000,
            },
            0,
        );
    }
    assert_eq!(reads, WINDOW, "no acknowledgement, no more pages");
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
            .prop_map(|mac| Message::Proof(Proof::SharedSecret { mac })),
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
                        heads
                    })
                    .collect(),
                upto
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
                    .map(|(id, heads)| WantChanges { id, heads })
                    .collect()
            }),
        (
            any::<u64>(),
            prop::collection::vec((id.clone(), bytes.clone()), 0..4),
            any::<bool>()
        )
            .prop_map(|(req, docs, done)| Message::Docs {
                req,
                docs: docs
                    .into_iter()
                    .map(|(id, bytes)| DocPayload {
                        id,
                        collection: "visits".into(),
                        bytes,
                        heads: ByteBuf::new(),
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
            }
        }),
        any::<u64>().prop_map(|upto| Message::Ack { upto }),
    ]
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
