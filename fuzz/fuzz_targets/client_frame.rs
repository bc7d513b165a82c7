//! The client frame decoder (`chatlog_wire::frame::FrameDecoder`) fed arbitrary bytes in
//! pieces, each payload then decoded as a `chatlog.v1.Frame` and a
//! `chatlog.node.v1.NodeFrame`. Nothing may panic; how the input is split must not change
//! the frames; a decoded message re-encodes to a fixed point. Its seed corpus is the one
//! `wire/tests/frame_corpus.rs` runs on stable: run with
//! `cargo +nightly fuzz run client_frame wire/tests/frame_corpus`.

#![no_main]

use bytes::Bytes;
use chatlog_wire::frame::FrameDecoder;
use chatlog_wire::limits::FRAME_BYTES_MAX;
use chatlog_wire::proto::node::v1::NodeFrame;
use chatlog_wire::proto::v1::Frame;
use prost::Message;

fn decode(data: &[u8], piece: usize) -> (Vec<Bytes>, bool) {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let mut out = Vec::new();
    for mut chunk in data.chunks(piece.max(1)) {
        loop {
            match decoder.decode(&mut chunk) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, decoder.finish().is_err())
}

fn fixed_point<M: Message + Default + PartialEq + std::fmt::Debug>(payload: &Bytes) {
    if let Ok(m) = M::decode(payload.clone()) {
        let again = m.encode_to_vec();
        let m2 = M::decode(&again[..]).expect("a re-encoded message decodes");
        assert_eq!(m2, m);
        assert_eq!(m2.encode_to_vec(), again);
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (whole, failed) = decode(data, data.len());
    let piece = data.first().map_or(1, |b| usize::from(*b % 16) + 1);
    let (split, split_failed) = decode(data, piece);
    assert_eq!(whole, split, "pieces of {piece} give other frames");
    assert_eq!(failed, split_failed, "pieces of {piece} end differently");
    for p in &whole {
        fixed_point::<Frame>(p);
        fixed_point::<NodeFrame>(p);
    }
});
