//! The frame decoder must never panic, loop or allocate past its limit, whatever the bytes and
//! however they are split into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (chunk, rest) = match data.split_first() {
        Some((c, r)) => (*c as usize + 1, r),
        None => return,
    };
    let frames = multiproc::connection::fuzz_frame_decoder(rest, chunk, 1 << 16);
    assert!(frames.iter().all(|f| f.len() <= 1 << 16));
});
