//! Enrollment: a joining device presents an invite's token to the admin device that made
//! it, over the mesh's encrypted transport (`/medmesh/enroll/1`), and gets its
//! certificate. One request and one answer, each a length-prefixed CBOR message of
//! bounded size; the inviter answers a few joining devices at a time (single use is kept
//! by the redeeming itself, see `trust::redeem`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use medmesh_protocol::membership::{
    EnrollAnswer, EnrollRequest, Invite, MAX_ENCODED, decode_enroll, encode_enroll,
};

use crate::trust::{self, Trust};

/// The enrollment stream's name.
pub const ENROLL_PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/enroll/1");
/// A joining device that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a joining device tries to reach the inviter.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest enrollment message.
const MAX_MESSAGE: usize = 2 * MAX_ENCODED;
/// Joining devices answered at once; more are told to retry.
const AT_ONCE: usize = 8;

async fn write_message(stream: &mut libp2p::Stream, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len()).context("message too large")?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_message(stream: &mut libp2p::Stream) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        bail!("an enrollment message of {len} bytes is larger than any genuine one");
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// Answers joining devices, each on its own task (libp2p drops a stream that is not
/// taken at once) and at most [`AT_ONCE`] at a time, until the streams end.
pub(super) async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    dir: PathBuf,
    trust: Trust,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = incoming.next() => next,
        };
        let Some((peer, mut stream)) = next else {
            return;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many joining devices at once; this one is told to retry");
            tokio::spawn(async move {
                let busy = EnrollAnswer::Refused {
                    reason:
                        "the inviting device is busy admitting other devices; try again in a moment"
                            .into(),
                };
                let _ = write_message(&mut stream, &encode_enroll(&busy)).await;
                let _ = stream.close().await;
            });
            continue;
        };
        let dir = dir.clone();
        let trust = trust.clone();
        tokio::spawn(async move {
            answer(peer, stream, dir, trust).await;
            drop(slot);
        });
    }
}

/// Reads one joining device's request and answers it.
async fn answer(peer: PeerId, mut stream: libp2p::Stream, dir: PathBuf, trust: Trust) {
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, read_message(&mut stream)).await {
        Ok(Ok(bytes)) => match decode_enroll::<EnrollRequest>(&bytes) {
            Ok(request) => {
                let peer = peer.to_string();
                tokio::task::spawn_blocking(move || {
                    trust::redeem(&dir, &trust, &request.token, &peer, &request.name)
                })
                .await
                .unwrap_or_else(|_| EnrollAnswer::Refused {
                    reason: "the inviting device was interrupted; try again".into(),
                })
            }
            Err(err) => EnrollAnswer::Refused {
                reason: format!("the request was not understood: {err}"),
            },
        },
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "an enrollment request could not be read");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "an enrollment request did not arrive in time");
            return;
        }
    };
    let _ = write_message(&mut stream, &encode_enroll(&answer)).await;
    let _ = stream.close().await;
}

/// Presents `invite` to the device that made it, as `keypair`'s device asking for the
/// name `name`. Answers the inviter's answer.
pub async fn join(keypair: Keypair, invite: &Invite, name: &str) -> Result<EnrollAnswer> {
    let inviter: PeerId = invite.inviter.parse().map_err(|_| {
        anyhow!("this invite is damaged (its device id is not readable); copy it again")
    })?;
    if invite.addrs.is_empty() {
        bail!(
            "this invite names no address of the device that made it; make it again on a running admin node"
        );
    }
    let mut swarm = super::network::build_swarm(keypair)?;
    let mut control = swarm.behaviour().stream.new_control();
    for addr in &invite.addrs {
        let Ok(mut addr) = addr.parse::<Multiaddr>() else {
            continue;
        };
        if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
            addr.push(Protocol::P2p(inviter));
        }
        let _ = swarm.dial(addr);
    }
    let driver = tokio::spawn(async move {
        loop {
            let _ = swarm.select_next_some().await;
        }
    });
    let request = encode_enroll(&EnrollRequest {
        token: invite.token.clone(),
        name: name.to_owned(),
    });
    let attempt = async {
        let mut last_err = None;
        let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            // A connection that breaks before the answer (the inviter keeps one connection
            // per pair of devices and may close a second one) is tried again: the
            // inviter admits the same device again if its answer was lost.
            let exchanged = async {
                let mut stream = control
                    .open_stream(inviter, ENROLL_PROTOCOL)
                    .await
                    .map_err(|e| anyhow!(e.to_string()))?;
                write_message(&mut stream, &request).await?;
                read_message(&mut stream).await
            }
            .await;
            match exchanged {
                Ok(bytes) => {
                    return decode_enroll::<EnrollAnswer>(&bytes).map_err(|err| {
                        anyhow!("the inviting device answered something unreadable: {err}")
                    });
                }
                Err(err) => {
                    last_err = Some(format!("{err:#}"));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(anyhow!(
            "could not reach the device that made the invite at {} ({}); it must be running (`medmesh start`) and on the same network as this one",
            invite.addrs.join(", "),
            last_err.unwrap_or_else(|| "no answer".into())
        ))
    };
    let answer = tokio::time::timeout(JOIN_TIMEOUT + REQUEST_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "the device that made the invite did not answer in time; try again"
            ))
        });
    driver.abort();
    answer
}
