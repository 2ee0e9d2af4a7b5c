//! Bytes from the network, before and after the handshake: the frame decoder never
//! panics, never buffers more than one allowed frame, and every message it accepts
//! encodes again to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::wire::{FrameDecoder, Limits, encode};

fuzz_target!(|data: &[u8]| {
    // The first byte says how the bytes are cut into reads, as a socket might.
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let read = usize::from(cut).max(1);
    for limits in [Limits::HANDSHAKE, Limits::OPEN] {
        let mut decoder = FrameDecoder::new();
        'reads: for piece in bytes.chunks(read) {
            decoder.push(piece);
            loop {
                match decoder.next_message_within(limits) {
                    Ok(Some(message)) => {
                        if let Ok(frame) = encode(&message) {
                            let mut again = FrameDecoder::new();
                            again.push(&frame);
                            let decoded = again.next_message().expect("a message re-decodes");
                            assert_eq!(decoded, Some(message), "a message survives a round trip");
                        }
                    }
                    Ok(None) => break,
                    // The session closes the stream here.
                    Err(_) => break 'reads,
                }
            }
            assert!(
                decoder.buffered() <= 4 + limits.frame + read,
                "the decoder buffers at most one allowed frame"
            );
        }
    }
});
